-- Pacing for wrk, which has no rate option: with BENCH_RATE set (requests per second of
-- this wrk thread), every request waits for its slot on a fixed schedule of 1/BENCH_RATE
-- seconds, whichever of the thread's connections sends it, so the rate is BENCH_RATE
-- however long the answers take (as long as the connections keep up); a slot missed is
-- caught up at once. wrk starts its latency clock when the request is written, after the
-- delay. The clock is clock_gettime(CLOCK_MONOTONIC) through LuaJIT's FFI (wrk's Lua has
-- no clock of its own); wrk's timers have 1 ms resolution, so a request leaves within
-- 0.5 ms of its slot.
local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate and rate > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local CLOCK_MONOTONIC = 1
  local ts = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval_ms = 1000 / rate
  local next_slot = nil

  function delay()
    local now = now_ms()
    next_slot = next_slot or now
    local wait = next_slot - now
    next_slot = next_slot + interval_ms
    if wait <= 0 then
      return 0
    end
    return math.floor(wait + 0.5)
  end
end
