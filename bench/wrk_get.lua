-- wrk recipe: GET /data/{key} over a key space of 100000 keys (populate it
-- first with wrk_post.lua so most GETs hit; misses answer 404).
--   wrk -t2 -c50 -d10s -s bench/wrk_get.lua http://127.0.0.1:8080
request = function()
  return wrk.format("GET", "/data/k" .. math.random(0, 99999))
end
