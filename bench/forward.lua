-- Forward-proxy mode for wrk: every request uses the absolute-form target that an
-- HTTP_PROXY client sends ("GET http://api.demo.local/hello HTTP/1.1", Host: api.demo.local),
-- while wrk connects to the proxy given on its command line.
-- Target URL: $BENCH_FORWARD_URL, default http://api.demo.local/hello.
local url = os.getenv("BENCH_FORWARD_URL") or "http://api.demo.local/hello"
wrk.path = url
wrk.headers["Host"] = url:match("^%a+://([^/?]+)")

-- The JSON reporter shared with the other targets (report.lua next to this file).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
