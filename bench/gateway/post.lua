-- wrk script for bench/gateway_overhead.py: POST one JSON body on every request.
-- The body comes from the environment (WRK_BODY), so the non-stream and stream variants
-- are the same script: {"stream": true} in the body makes the backend answer with SSE, and
-- wrk reads the chunked stream to its end before it counts the request.
-- done() prints one machine-readable line (WRKJSON ...) that the benchmark parses.

wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY")
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d," ..
    "\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
