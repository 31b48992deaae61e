"""Prescient's plugin for a stock vLLM engine (entry point group `vllm.stat_logger_plugins`).

`status` turns vLLM's per-step statistics into a llumlet status (pure, no vLLM import);
`plugin` is the `StatLoggerBase` vLLM loads, which pushes that status to the llumlet.
"""
