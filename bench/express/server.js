// The Express peer of custom-lang's REST `POST /invoke`, for bench/rest_db.py: the same
// answer and the same synchronous INSERT into the same PostgreSQL table, written the way
// an Express user would (express.json, a node-postgres Pool of 10, one query per request).
// Connection settings come from the standard PG* variables (PGHOST, PGDATABASE, PGUSER).
"use strict";

const express = require("express");
const { Pool } = require("pg");

const INSERT_EXECUTION =
  "INSERT INTO executions (name, result_message, status_code) VALUES ($1, $2, $3)";
const MAX_NAME_LENGTH = 255;

const pool = new Pool({ max: 10 });
const app = express();
app.use(express.json({ limit: "1mb" }));

app.post("/invoke", async (req, res) => {
  const raw = req.body && typeof req.body.name === "string" ? req.body.name : "";
  const name = raw || "World";
  const message = `Hello ${name} from custom-lang-service!`;
  try {
    // Like custom-lang: the row exists before the answer; a failed insert is logged.
    await pool.query(INSERT_EXECUTION, [name.slice(0, MAX_NAME_LENGTH), message, 200]);
  } catch (err) {
    console.error("execution not recorded:", err.message);
  }
  res.json({ message });
});

app.get("/healthz", async (req, res) => {
  try {
    await pool.query("SELECT 1");
    res.type("text").send("ok");
  } catch (err) {
    res.status(503).type("text").send("database unavailable");
  }
});

const port = Number(process.env.PORT || 3100);
const server = app.listen(port, "127.0.0.1");
process.on("SIGTERM", () => server.close(() => pool.end().then(() => process.exit(0))));
