-- The TLS client certificate each worker registered with, when the
-- coordinator requires them (`tls_client_ca`): its SHA-256 fingerprint (hex)
-- and subject, or '' for none. A worker registered with a certificate is
-- driven (leases renewed, tasks completed or failed) only over a connection
-- presenting that same certificate, whatever token the caller holds.
ALTER TABLE workers ADD COLUMN client_cert_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN client_cert_subject TEXT NOT NULL DEFAULT '';
