-- A stand-in on branch "ids" only: 0005 is the relay branch's migration. Drop this file when
-- merging (the relay branch's 0005 takes its place; 0006 follows it).
SELECT 1;
