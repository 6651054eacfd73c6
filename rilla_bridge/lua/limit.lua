-- The intake limit alone, for a webhook whose body will be refused anyway (a 400 comes after
-- a 429 in SPEC's order of checks, and a bad body still counts against the limit).
-- KEYS: 1 the tenant's limit hash. ARGV: 1 now (s), 2 events/s, 3 bytes/s, 4 body size.
--#include lib/limit
return take_intake(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]))
