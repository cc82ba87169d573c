"""Every error a tree can record. Each has a stable `kind` used in tree records and metrics."""


class IDAError(Exception):
    kind = "ida_error"


class MalformedQuestion(IDAError, ValueError):
    """A question string that the task's parser rejects (bad user input or a bad split)."""

    kind = "malformed_question"


class ParseError(IDAError, ValueError):
    """Model (or person) output that is not a well-formed Answer or Split."""

    kind = "parse_error"


class ExpertCannotAnswer(IDAError):
    """The coded expert was asked to answer directly above its base size."""

    kind = "expert_cannot_answer"


class ExpertFailure(IDAError):
    """The expert raised while handling a step. An expert that pays for its calls says what the
    failed step still cost: `attempts` (requests sent) and `usage` (an ida_ray.experts.ExpertUsage),
    which the tree adds to its own."""

    kind = "expert_failure"

    def __init__(self, message: str = "", *, attempts: int = 1, usage=None):
        super().__init__(message)
        self.attempts = attempts
        self.usage = usage


class ExpertBudgetExhausted(ExpertFailure):
    """The expert's call budget is spent: H' answers alone where the model has a step."""

    kind = "expert_budget"


class DepthExceeded(IDAError):
    kind = "depth_exceeded"


class FanInRoundsExceeded(IDAError):
    kind = "fan_in_rounds_exceeded"


class OutputTooLong(IDAError):
    """Generation hit max_new_tokens without end-of-sequence."""

    kind = "output_too_long"


class EngineFailure(IDAError):
    """A model call failed after all retries (dead replica, lost actor)."""

    kind = "engine_failure"


class StaleWeights(IDAError):
    """A replica asked for weights newer than it holds: Ray restarted it on its creation
    weights (version 0). It serves nothing until it is given the latest; the pool takes it out
    of rotation, re-sends the request elsewhere and resyncs it (ida_ray/serving/engine_pool.py)."""

    kind = "stale_weights"


class NoAdversary(IDAError):
    """Adversary scores asked of an engine started without an adversary. Never a silent 0.0:
    with `amplify.confidence: adversary` that would pass every threshold (H' trusting the
    model everywhere), and branch choice and adversarial questions would be uniform."""

    kind = "no_adversary"


class ConfigError(IDAError, ValueError):
    kind = "config_error"


class DiskFull(IDAError):
    """The run directory's filesystem is (nearly) full: the run stops before it writes what it
    could not finish; completed iterations and checkpoints stay, and --resume continues."""

    kind = "disk_full"


class StagingError(IDAError):
    """An iteration's staged trees do not match its jobs: a job's results were lost on the way
    to the replay buffer, or bookkeeping counted one twice."""

    kind = "staging_error"
