-- Runs once, when the PostgreSQL volume is first initialised: one database per service
-- (database-per-service). Each service creates its own tables at startup (migrations).
CREATE DATABASE greeter_db;
CREATE DATABASE caller_db;
CREATE DATABASE gateway_db;
CREATE DATABASE auth_db;
CREATE DATABASE lang_db;
