-- wrk recipe: POST /data with JSON bodies over a key space of 100000 keys.
--   wrk -t2 -c50 -d10s -s bench/wrk_post.lua http://127.0.0.1:8080
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local value = string.rep("x", 100)
request = function()
  local key = "k" .. math.random(0, 99999)
  return wrk.format(nil, "/data", nil, '{"key":"' .. key .. '","value":"' .. value .. '"}')
end
