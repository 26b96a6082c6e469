//! `hostile`: a handler that attacks its own sandbox, for the end-to-end
//! tests of the sandbox (`tests/tests/sandbox.rs`).
//!
//! Every run first inserts its event id into `hostile_notes` (its only
//! table), so a test can prove that nothing of a failed event committed.
//! Then it does what the event type says, ignores every error it gets and
//! returns `Ok` with a JSON result saying what happened: the host, not the
//! handler's good manners, must make the event fail.
//!
//! | type | attack | the host must answer |
//! |---|---|---|
//! | `hostile.ok` | nothing (the control case) | 202 |
//! | `hostile.commit` | `COMMIT` | 422 `statement-refused` |
//! | `hostile.rollback` | `ROLLBACK` | 422 `statement-refused` |
//! | `hostile.begin` | `BEGIN` | 422 `statement-refused` |
//! | `hostile.savepoint` | `SAVEPOINT x` | 422 `statement-refused` |
//! | `hostile.select-commit` | `SELECT 1; COMMIT` | 422 `statement-refused` |
//! | `hostile.set-role` | `SET ROLE postgres` | 422 `statement-refused` |
//! | `hostile.reset-role` | `RESET ROLE` | 422 `statement-refused` |
//! | `hostile.set-search-path` | `SET search_path = public` | 422 `statement-refused` |
//! | `hostile.drop-table` | `DROP TABLE orders` | 422 `statement-refused` |
//! | `hostile.create-table` | `CREATE TABLE x(i int)` | 422 `statement-refused` |
//! | `hostile.copy-program` | `COPY (SELECT 1) TO PROGRAM 'true'` | 422 `statement-refused` |
//! | `hostile.read-host-table` | reads the host's `processed_events` | 422 `statement-refused` |
//! | `hostile.update-other` | `UPDATE test_effects …` (the testkit's table) | 422 `statement-refused` |
//! | `hostile.pg-sleep` | a statement that never ends (`pg_sleep(600)`; SQLite: counts to 10^12) | 500 `statement-timeout` (SQLite: `deadline`) |
//! | `hostile.loop` | an infinite loop | 500 `deadline` |
//! | `hostile.alloc` | allocates and touches 1 GiB | 500 `memory-limit` |
//! | `hostile.recurse` | unbounded recursion | 500 `trap` |
//! | `hostile.log-flood` | 100 MiB through `log::info`, in 64 KiB lines | 500 `log-limit` |
//! | `hostile.stdout-flood` | 100 MiB through `println!`, in 64 KiB lines | 500 `log-limit` |
//! | `hostile.rows` | a query returning 10 million rows | 500 `too-many-rows` |
//! | `hostile.big-result` | a query returning 10 rows of 1 MiB each | 500 `result-too-large` |
//! | `hostile.statements` | 100,000 `SELECT 1` statements | 500 `too-many-statements` |
//! | `hostile.many-params` | `SELECT $1 + … + $n` with `n` (data `{"n": …}`) integer parameters | 500 `too-many-parameters` when `n` > 1,000 |
//! | `hostile.big-param` | one text parameter of `bytes` (data) bytes | 500 `too-many-parameters` when over `max_result_bytes` |
//! | `hostile.long-numeric` | one `numeric` parameter of `digits` (data) digits | 500 `statement-failed` when over 1,000 |
//! | `hostile.long-sql` | `SELECT 1` followed by a comment, `bytes` (data) long in all | 422 `statement-refused` when over 64 KiB |
//! | `hostile.big-reply` | a reply event with `bytes` (data) bytes of data | 422 `bad-outcome` when over `max_reply_bytes` |
//! | `hostile.big-outcome` | a JSON result of `bytes` (data) bytes | 422 `bad-outcome` when over `max_reply_bytes` |
//! | `hostile.read-file` | reads `/etc/passwd`, lists `/`, writes `/tmp` | 202, every operation failed |
//! | `hostile.env` | reads `HOME`, the environment and the arguments | 202, all empty |
//! | `hostile.socket` | TCP connect, UDP send and a name lookup to the ports in the data | 202, every operation failed |
//! | `hostile.sql` | the statements in the data, as they are (see below) | depends on the SQL (`tests/tests/wall.rs`) |
//!
//! `hostile.sql` runs arbitrary SQL for the tests of the wall
//! (`tests/tests/wall.rs`). Its data is
//!
//! ```json
//! {"statements": [{"sql": "...", "params": [1, "a", null], "query": true}], "result_from": null}
//! ```
//!
//! Each statement runs in order (`query: true` with `tx.query`, else
//! `tx.execute`; parameters: string → text, integer → int, other number →
//! float, bool → boolean, null → null, anything else → JSON). Every error is
//! recorded and ignored. The result is `{"results": [...]}`, one entry per
//! statement: `{"rows": [[…], …], "columns": […]}` (query),
//! `{"affected": n}` (execute) or `{"error": {"kind", "code", "message"}}`;
//! with `"result_from": i` it also carries `"result"`, a copy of entry `i`.
//!
//! Anything else is a permanent error naming the type.

use std::hint::black_box;

use exactly_guest::{Backend, DbError, Error, Event, Outcome, Reply, Tx, Value, log, params};
use serde_json::{Value as Json, json};

exactly_guest::export_handler!(handle);

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn handle(event: Event, tx: &Tx) -> Result<Outcome, Error> {
    tx.execute(
        "INSERT INTO hostile_notes (k) VALUES ($1)",
        params![event.id()],
    )?;
    let postgres = tx.backend() == Backend::Postgres;

    let result = match event.ty() {
        "hostile.ok" => json!({ "ok": true }),

        // Statements the host must refuse before they reach the database.
        "hostile.commit" => execute(tx, "COMMIT"),
        "hostile.rollback" => execute(tx, "ROLLBACK"),
        "hostile.begin" => execute(tx, "BEGIN"),
        "hostile.savepoint" => execute(tx, "SAVEPOINT x"),
        "hostile.select-commit" => query(tx, "SELECT 1; COMMIT"),
        "hostile.set-role" => execute(tx, "SET ROLE postgres"),
        "hostile.reset-role" => execute(tx, "RESET ROLE"),
        "hostile.set-search-path" => execute(tx, "SET search_path = public"),
        "hostile.drop-table" => execute(tx, "DROP TABLE orders"),
        "hostile.create-table" => execute(tx, "CREATE TABLE x(i int)"),
        "hostile.copy-program" => execute(tx, "COPY (SELECT 1) TO PROGRAM 'true'"),
        "hostile.read-host-table" => query(
            tx,
            if postgres {
                "SELECT * FROM exactly.processed_events"
            } else {
                "SELECT * FROM exactly_processed_events"
            },
        ),
        "hostile.update-other" => execute(tx, "UPDATE test_effects SET note = 'pwned'"),

        // Resource abuse.
        "hostile.pg-sleep" => query(
            tx,
            if postgres {
                "SELECT pg_sleep(600)"
            } else {
                // About 10^12 steps: hours.
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000000) \
                 SELECT count(*) AS n FROM c"
            },
        ),
        "hostile.loop" => spin(),
        "hostile.alloc" => allocate(1024),
        "hostile.recurse" => json!({ "depth": recurse(0) }),
        "hostile.log-flood" => flood(|line| log::info(line)),
        "hostile.stdout-flood" => flood(|line| println!("{line}")),
        "hostile.rows" => query(
            tx,
            if postgres {
                "SELECT generate_series(1, 10000000) AS x"
            } else {
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000) \
                 SELECT x FROM c"
            },
        ),
        // Ten rows (far below max_rows) of 1 MiB of text each. The rows come
        // from a recursive CTE: this case is about the byte cap, not about
        // table functions such as `FROM generate_series(…)`.
        "hostile.big-result" => query(
            tx,
            if postgres {
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10) \
                 SELECT repeat('x', 1048576) AS blob FROM c"
            } else {
                // A string doubled 20 times: 1 MiB of text (zeroblob and
                // randomblob are not on SQLite's function allowlist).
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10), \
                 s(v, n) AS (SELECT 'x', 0 UNION ALL SELECT v || v, n + 1 FROM s WHERE n < 20) \
                 SELECT v AS blob FROM c, s WHERE n = 20"
            },
        ),
        "hostile.statements" => statements(tx, 100_000),

        // What a handler makes the host do before any limit of the
        // database applies: sizes from the event's data.
        "hostile.many-params" => {
            let n = size(&event, "n")?;
            let sql = format!(
                "SELECT {} AS n",
                (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(" + ")
            );
            let params: Vec<Value> = (0..n).map(|_| Value::Int(1)).collect();
            statement(tx, &sql, &params)
        }
        "hostile.big-param" => {
            let text = "x".repeat(size(&event, "bytes")?);
            statement(tx, "SELECT length($1) AS n", &[Value::Text(text)])
        }
        "hostile.long-numeric" => {
            let digits = "9".repeat(size(&event, "digits")?);
            statement(tx, "SELECT 1 AS n WHERE $1 IS NOT NULL", &[Value::numeric(digits)])
        }
        "hostile.long-sql" => {
            let bytes = size(&event, "bytes")?;
            let sql = format!("SELECT 1 AS n /*{}*/", "x".repeat(bytes.saturating_sub(17)));
            statement(tx, &sql, &[])
        }
        "hostile.big-reply" => {
            let data = vec![b'x'; size(&event, "bytes")?];
            return Ok(Outcome::json(json!({ "reply_bytes": data.len() }))
                .with_reply(Reply::new("hostile.reply").data("application/octet-stream", data)));
        }
        "hostile.big-outcome" => json!({ "padding": "x".repeat(size(&event, "bytes")?) }),

        // Ambient capabilities a handler must not have.
        "hostile.read-file" => files(),
        "hostile.env" => environment(),
        "hostile.socket" => sockets(&event)?,

        // Arbitrary SQL from the event's data (the wall tests).
        "hostile.sql" => run_sql(tx, &event)?,

        other => {
            return Err(Error::permanent(format!(
                "hostile has no behaviour for event type {other:?}"
            )));
        }
    };
    Ok(Outcome::json(result))
}

/// A size from the event's data: `{"<name>": n}`.
fn size(event: &Event, name: &str) -> Result<usize, Error> {
    let data: Json = event.data_json()?;
    data.get(name)
        .and_then(Json::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| Error::permanent(format!("data.{name} must be a number")))
}

/// Runs `sql` with `params` as a query, ignoring any error; the result
/// leaves the SQL out (it may be huge).
fn statement(tx: &Tx, sql: &str, params: &[Value]) -> Json {
    match tx.query(sql, params) {
        Ok(rows) => {
            log::error!("a statement of {} bytes with {} parameters was accepted", sql.len(), params.len());
            json!({ "rows": rows.len() })
        }
        Err(error) => {
            log::warn!("the statement failed, ignoring it: {error}");
            json!({ "error": describe_db_error(&error) })
        }
    }
}

/// Runs `sql` with `execute`, ignoring any error.
fn execute(tx: &Tx, sql: &str) -> Json {
    match tx.execute(sql, params![]) {
        Ok(count) => {
            log::error!("{sql} was accepted ({count} rows)");
            json!({ "sql": sql, "accepted": count })
        }
        Err(error) => {
            log::warn!("{sql} failed, ignoring it: {error}");
            json!({ "sql": sql, "error": describe_db_error(&error) })
        }
    }
}

/// Runs `sql` with `query`, ignoring any error.
fn query(tx: &Tx, sql: &str) -> Json {
    match tx.query(sql, params![]) {
        Ok(rows) => {
            log::error!("{sql} was accepted ({} rows)", rows.len());
            json!({ "sql": sql, "rows": rows.len() })
        }
        Err(error) => {
            log::warn!("{sql} failed, ignoring it: {error}");
            json!({ "sql": sql, "error": describe_db_error(&error) })
        }
    }
}

fn describe_db_error(error: &DbError) -> String {
    format!("{:?}: {error}", error.kind())
}

/// Never returns.
fn spin() -> Json {
    let mut turns: u64 = 0;
    loop {
        turns = black_box(turns.wrapping_add(1));
    }
}

/// Allocates `mib` MiB in 1 MiB chunks and writes to every page of each,
/// keeping all of them alive.
fn allocate(mib: usize) -> Json {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for index in 0..mib {
        let mut chunk = vec![0u8; MIB];
        for page in chunk.chunks_mut(4 * KIB) {
            page[0] = (index as u8) | 1;
        }
        chunks.push(black_box(chunk));
    }
    let touched: usize = chunks.iter().map(|chunk| usize::from(chunk[0])).sum();
    json!({ "allocated_mib": chunks.len(), "touched": touched })
}

/// Recurses until the stack runs out. Every frame holds a 16 KiB array the
/// optimizer cannot see through, and the result of the recursive call is
/// used after it returns, so this is neither a loop nor a tail call.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 16 * KIB];
    frame[depth as usize % frame.len()] = depth as u8;
    let frame = black_box(frame);
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let deeper = recurse(depth + 1);
    deeper.wrapping_add(u64::from(frame[(depth as usize * 31) % frame.len()]))
}

/// Writes 100 MiB in 64 KiB lines through `write`.
fn flood(write: impl Fn(&str)) -> Json {
    let line = "x".repeat(64 * KIB);
    let lines = 100 * MIB / line.len();
    for _ in 0..lines {
        write(&line);
    }
    json!({ "lines": lines, "bytes": lines * line.len() })
}

/// Runs `count` tiny statements, ignoring errors.
fn statements(tx: &Tx, count: u32) -> Json {
    let mut accepted: u32 = 0;
    let mut first_error = None;
    for _ in 0..count {
        match tx.query("SELECT 1", params![]) {
            Ok(_) => accepted += 1,
            Err(error) => {
                first_error.get_or_insert_with(|| describe_db_error(&error));
            }
        }
    }
    json!({ "statements": count, "accepted": accepted, "first_error": first_error })
}

/// `"ok: …"` or `"error: …"`.
fn outcome<T>(result: std::io::Result<T>, describe: impl FnOnce(T) -> String) -> String {
    match result {
        Ok(value) => format!("ok: {}", describe(value)),
        Err(error) => format!("error: {error}"),
    }
}

fn files() -> Json {
    json!({
        "read_file": outcome(std::fs::read("/etc/passwd"), |bytes| format!("{} bytes", bytes.len())),
        "read_dir": outcome(std::fs::read_dir("/"), |entries| format!("{} entries", entries.count())),
        "write_file": outcome(std::fs::write("/tmp/exactly-hostile", b"pwned"), |()| "written".to_owned()),
    })
}

fn environment() -> Json {
    json!({
        "home": std::env::var("HOME").ok(),
        "vars": std::env::vars_os()
            .map(|(name, value)| format!("{}={}", name.to_string_lossy(), value.to_string_lossy()))
            .collect::<Vec<_>>(),
        "args": std::env::args_os()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
    })
}

/// Tries the network: `{"tcp_port": N, "udp_port": M}` in the data name a
/// TCP listener and a UDP socket of the test on 127.0.0.1.
fn sockets(event: &Event) -> Result<Json, Error> {
    use std::net::{TcpStream, ToSocketAddrs, UdpSocket};

    let data: Json = event.data_json()?;
    let port = |name: &str| {
        data.get(name)
            .and_then(Json::as_u64)
            .and_then(|port| u16::try_from(port).ok())
            .ok_or_else(|| Error::permanent(format!("data.{name} must be a port number")))
    };
    let tcp_port = port("tcp_port")?;
    let udp_port = port("udp_port")?;

    let tcp = outcome(TcpStream::connect(("127.0.0.1", tcp_port)), |stream| {
        format!("connected from {:?}", stream.local_addr())
    });
    let udp = outcome(
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| socket.send_to(b"hostile", ("127.0.0.1", udp_port))),
        |sent| format!("sent {sent} bytes"),
    );
    let lookup = outcome(("localhost", tcp_port).to_socket_addrs(), |addresses| {
        format!("{:?}", addresses.collect::<Vec<_>>())
    });
    Ok(json!({ "tcp_connect": tcp, "udp_send": udp, "name_lookup": lookup }))
}

/// `hostile.sql`: runs the statements of the event's data, in order,
/// recording each one's rows or error and ignoring errors.
fn run_sql(tx: &Tx, event: &Event) -> Result<Json, Error> {
    let data: Json = event.data_json()?;
    let statements = data
        .get("statements")
        .and_then(Json::as_array)
        .ok_or_else(|| Error::permanent("data.statements must be an array"))?;
    let mut results = Vec::with_capacity(statements.len());
    for statement in statements {
        let sql = statement
            .get("sql")
            .and_then(Json::as_str)
            .ok_or_else(|| Error::permanent("every statement needs a string `sql`"))?;
        let params: Vec<Value> = statement
            .get("params")
            .and_then(Json::as_array)
            .map(|params| params.iter().map(sql_value).collect())
            .unwrap_or_default();
        let want_rows = statement
            .get("query")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let outcome = if want_rows {
            tx.query(sql, &params).map(|rows| {
                json!({
                    "columns": rows.columns(),
                    "rows": rows
                        .iter()
                        .map(|row| row.values().iter().map(json_value).collect::<Vec<_>>())
                        .collect::<Vec<_>>(),
                })
            })
        } else {
            tx.execute(sql, &params)
                .map(|affected| json!({ "affected": affected }))
        };
        results.push(match outcome {
            Ok(result) => {
                log::error!("{sql} was accepted");
                result
            }
            Err(error) => {
                log::warn!("{sql} failed, ignoring it: {error}");
                json!({ "error": {
                    "kind": format!("{:?}", error.kind()),
                    "code": error.code(),
                    "message": error.message(),
                }})
            }
        });
    }
    let mut result = json!({ "results": results });
    if let Some(index) = data.get("result_from").and_then(Json::as_u64) {
        let chosen = result["results"]
            .get(index as usize)
            .cloned()
            .unwrap_or(Json::Null);
        result["result"] = chosen;
    }
    Ok(result)
}

/// A JSON parameter as a SQL value.
fn sql_value(param: &Json) -> Value {
    match param {
        Json::Null => Value::Null,
        Json::Bool(flag) => Value::Boolean(*flag),
        Json::Number(number) => match number.as_i64() {
            Some(integer) => Value::Int(integer),
            None => Value::Float(number.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(text) => Value::Text(text.clone()),
        other => Value::Json(other.to_string()),
    }
}

/// A SQL value as JSON (bytes as lower-case hex).
fn json_value(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(flag) => json!(flag),
        Value::Int(integer) => json!(integer),
        Value::Float(number) => json!(number),
        Value::Text(text) | Value::Numeric(text) | Value::Timestamp(text) => json!(text),
        Value::Bytes(bytes) => json!(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        Value::Json(text) => serde_json::from_str(text).unwrap_or_else(|_| json!(text)),
    }
}
