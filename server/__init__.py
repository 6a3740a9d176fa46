"""The bundled development server, installed as ``streamload.server``."""

from .app import ServerConfig, create_app, run_server, runner_options
from .ranges import RangeDecision, RangeOutcome, decide_range

__all__ = ["RangeDecision", "RangeOutcome", "ServerConfig", "create_app", "decide_range", "run_server", "runner_options"]
