-- wrk reporter for bench/run.py: after the run, one line "WRK_JSON {...}" with the raw
-- counts and latency percentiles in microseconds (wrk's own text output rounds them).
-- With BENCH_RATE set, requests are paced (pace.lua next to this file).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "pace.lua")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
