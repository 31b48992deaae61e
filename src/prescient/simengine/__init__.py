"""The simulated engine served live: `SimEngine` in real time behind vLLM's OpenAI API.

`driver.RealtimeEngine` steps the pure engine on the event loop's clock and streams tokens;
`server` puts vLLM's HTTP API (and, optionally, a llumlet) in front of it; `cli` is
`prescient sim-engine`.
"""

from prescient.simengine.driver import RealtimeEngine, TokenStream
from prescient.simengine.server import SimEngineServer, build_app, make_engine, start_server

__all__ = ["RealtimeEngine", "SimEngineServer", "TokenStream", "build_app", "make_engine",
           "start_server"]
