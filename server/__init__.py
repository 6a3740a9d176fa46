"""The bundled development server, installed as ``streamload.server``."""

from .app import ServerConfig, create_app, create_runner, run_server, runner_options
from .ranges import RangeDecision, RangeOutcome, decide_range

__all__ = ["RangeDecision", "RangeOutcome", "ServerConfig", "create_app", "create_runner", "decide_range", "run_server", "runner_options"]
