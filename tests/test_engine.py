"""The in-process torch engine: batching, log-prob consistency, weight swap."""
import asyncio

import pytest

from ida_ray.config import TrainConfig
from ida_ray.engine import TorchEngine
from ida_ray.examples import Example
from ida_ray.models import ModelSpec, build_adversary, build_model
from ida_ray.training import ImitationObjective

SPEC = ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def parts():
    model, tok = build_model(SPEC, seed=0)
    adversary, _ = build_adversary(SPEC, seed=1)
    return model, adversary, tok


def test_batched_generation_equals_one_at_a_time(parts):
    model, adversary, tok = parts
    prompts = [f"A{i},{i + 3},7=" for i in range(6)] + ["O1,2,3,4,5,6,7,8="]
    batched = TorchEngine(model, adversary, tok, max_new_tokens=6)
    single = TorchEngine(model, adversary, tok, max_new_tokens=6, max_batch=1)

    async def go():
        b = await asyncio.gather(*(batched.generate([p]) for p in prompts))
        s = [await single.generate([p]) for p in prompts]
        return b, s
    b, s = asyncio.run(go())
    assert max(batched._gen.batch_sizes) == len(prompts)  # concurrent calls were one batch
    for (gb,), (gs,) in zip(b, s):
        assert gb.text == gs.text and gb.logprob == pytest.approx(gs.logprob, abs=1e-4)


def test_logprob_of_a_finished_generation_matches_its_generation_logprob(parts):
    model, adversary, tok = parts
    # Teach the model one answer so generation ends with EOS.
    trainer = ImitationObjective(model, adversary, tok, TrainConfig(lr=1e-2))
    for _ in range(60):
        trainer.model_step([Example("answer", "A1,2=", "3")] * 8)
    eng = TorchEngine(model, adversary, tok, max_new_tokens=6)
    (g,) = asyncio.run(eng.generate(["A1,2="]))
    assert g.finished and g.text == "3"
    (lp,) = asyncio.run(eng.logprob(["A1,2="], ["3"]))
    assert lp == pytest.approx(g.logprob, abs=1e-4)
    assert g.logprob > -0.1


def test_weight_swap_changes_outputs_and_version(parts):
    model, adversary, tok = parts
    fresh, _ = build_model(SPEC, seed=123)
    eng = TorchEngine(build_model(SPEC, seed=123)[0], adversary, tok, max_new_tokens=6)
    before = asyncio.run(eng.generate(["A1,2="]))[0]
    eng.load_state(model.state_dict(), None, version=7)
    after = asyncio.run(eng.generate(["A1,2="]))[0]
    assert eng.weight_version == 7 and after.weight_version == 7 and before.weight_version == 0
    ref = TorchEngine(model, adversary, tok, max_new_tokens=6)
    assert after.text == asyncio.run(ref.generate(["A1,2="]))[0].text


def test_adversary_trains_toward_its_targets(parts):
    _, adversary, tok = parts
    model, _ = build_model(SPEC)
    trainer = ImitationObjective(model, adversary, tok, TrainConfig(adversary_lr=1e-2))
    data = [Example("adversary", "A1,2=", "3", -0.1), Example("adversary", "A1,2=", "9", -8.0)]
    for _ in range(150):
        trainer.adversary_step(data * 4)
    eng = TorchEngine(model, adversary, tok)
    good, bad = asyncio.run(eng.adversary(["A1,2=", "A1,2="], ["3", "9"]))
    assert good == pytest.approx(-0.1, abs=0.5) and bad == pytest.approx(-8.0, abs=0.5)


def test_engine_failure_reaches_every_waiter(parts):
    model, adversary, tok = parts
    eng = TorchEngine(model, adversary, tok)

    def broken(batch):
        raise RuntimeError("device lost")
    eng._lp.fn = broken

    async def go():
        return await asyncio.gather(*(eng.logprob(["A1="], ["1"]) for _ in range(5)), return_exceptions=True)
    results = asyncio.run(go())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_adversary_scores_from_a_torch_engine_without_an_adversary_are_a_clear_error(parts):
    from ida_ray.errors import IDAError, NoAdversary

    model, _, tok = parts
    eng = TorchEngine(model, None, tok, max_new_tokens=6)
    with pytest.raises(NoAdversary, match="started without an adversary") as info:
        asyncio.run(eng.adversary(["A1,2="], ["3"]))
    assert isinstance(info.value, IDAError) and info.value.kind == "no_adversary"
    assert eng.calls["adversary"] == 0
    # The model's own calls are unaffected.
    (g,) = asyncio.run(eng.generate(["A1,2="]))
    (lp,) = asyncio.run(eng.logprob(["A1,2="], ["3"]))
    assert isinstance(g.text, str) and lp < 0


def test_adversary_confidence_without_an_adversary_fails_the_tree_instead_of_trusting_the_model(parts):
    # A silent 0.0 would pass log(1 - eps) for every step: H' would take the model's answer
    # everywhere and never call the expert.
    import random

    from ida_ray.amplify import amplify_tree
    from ida_ray.config import AmplifyConfig
    from ida_ray.tasks import get_task

    model, _, tok = parts
    eng = TorchEngine(model, None, tok, max_new_tokens=6)
    cfg = AmplifyConfig(confidence="adversary", branch_choice="uniform", audit_fraction=0.0, max_new_tokens=6)
    tree = asyncio.run(amplify_tree(get_task("sum"), eng, "3,1,4,1", cfg, random.Random(0)))
    assert not tree.ok and tree.error["kind"] == "no_adversary"
    assert "started without an adversary" in tree.error["message"]


class _Scorer:
    def __init__(self):
        self.seen = []

    async def score(self, prompts, completions):
        self.seen.append((list(prompts), list(completions)))
        return [-1.5] * len(prompts)


def _bare_vllm_engine(scorer):
    """A VllmEngine with only what `adversary` uses: no vLLM engine is started."""
    from ida_ray.serving.swap_gate import SwapGate
    from ida_ray.serving.vllm_engine import VllmEngine

    eng = VllmEngine.__new__(VllmEngine)
    eng.scorer, eng.gate = scorer, SwapGate()
    return eng


def test_adversary_scores_from_a_vllm_engine_without_an_adversary_are_a_clear_error():
    from ida_ray.errors import NoAdversary

    with pytest.raises(NoAdversary, match="started without an adversary"):
        asyncio.run(_bare_vllm_engine(None).adversary(["A1,2="], ["3"]))
    scorer = _Scorer()  # with an adversary, the scorer's scores come back as they are
    assert asyncio.run(_bare_vllm_engine(scorer).adversary(["A1,2="], ["3"])) == [-1.5]
    assert scorer.seen == [(["A1,2="], ["3"])]
