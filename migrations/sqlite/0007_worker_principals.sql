-- Who registered each worker: the token's role (`worker:gpu-a`), or '' when
-- authentication was off. With authentication on, the lease, complete and
-- fail calls naming a worker are accepted only from a caller with the token
-- it registered with (or an operator), so one worker token cannot renew,
-- complete or fail the leases of workers registered with another.
ALTER TABLE workers ADD COLUMN principal TEXT NOT NULL DEFAULT '';
