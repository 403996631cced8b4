-- A correction rewrites its usage's row (quantity, void marks, updated
-- time) and none of its indexed columns. With room left on the row's page,
-- PostgreSQL writes the new version there (a HOT update): no new entry in
-- any of the three indexes, one page changed instead of two. Inserts filled
-- every page to the brim, so most corrections moved their row and indexed
-- it anew (in a bench run with 2 % corrections, 1,943 of 5,980 updates of
-- usages were HOT). From now on inserts leave a tenth of each page free;
-- pages already written stay as they are: nothing is rewritten, and the
-- lock taken (SHARE UPDATE EXCLUSIVE) lets reads and writes go on.
SET LOCAL lock_timeout = '5s';
ALTER TABLE usages SET (fillfactor = 90);
