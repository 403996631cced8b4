//! Upgrades: migrations that a running service survives on big tables, and
//! that leave the schema usable by the release before them (a rolling deploy
//! runs both side by side; a rollback runs the previous one on the new
//! schema). The rules are in docs/operations.md ("Migrations"); here they
//! are enforced on every migration after the last one reviewed by hand.

use std::collections::BTreeSet;
use std::path::Path;

/// The newest migration written before the rules; docs/operations.md says
/// which locks each of them takes. Newer ones must follow the rules.
const LAST_REVIEWED: i64 = 20261206000014;

/// A statement preceded by this comment is let through: the comment says
/// why it is safe (a table known to be small, a column no release reads).
const WAIVER: &str = "-- upgrade-safe:";

struct Migration {
    version: i64,
    file: String,
    sql: String,
}

fn migrations() -> Vec<Migration> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut found: Vec<Migration> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".sql"))
        .map(|file| Migration {
            version: file.split('_').next().unwrap().parse().unwrap(),
            sql: std::fs::read_to_string(dir.join(&file)).unwrap(),
            file,
        })
        .collect();
    found.sort_by_key(|m| m.version);
    found
}

/// The statements of a migration, upper case, whitespace collapsed, without
/// comments and without the bodies of functions (`$$ ... $$`); each with
/// whether a waiver precedes it.
fn statements(sql: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let (mut current, mut waived, mut in_body) = (String::new(), false, false);
    for line in sql.lines() {
        let trimmed = line.trim();
        if !in_body && trimmed.starts_with(WAIVER) {
            waived = true;
            continue;
        }
        let code = match (in_body, line.find("--")) {
            (false, Some(i)) => &line[..i],
            _ => line,
        };
        for (i, part) in code.split("$$").enumerate() {
            if i > 0 {
                in_body = !in_body;
            }
            if in_body {
                continue;
            }
            for (j, piece) in part.split(';').enumerate() {
                if j > 0 {
                    let statement = current.split_whitespace().collect::<Vec<_>>().join(" ").to_uppercase();
                    if !statement.is_empty() {
                        out.push((statement, waived));
                    }
                    current.clear();
                    waived = false;
                }
                current.push_str(piece);
                current.push(' ');
            }
        }
    }
    let statement = current.split_whitespace().collect::<Vec<_>>().join(" ").to_uppercase();
    if !statement.is_empty() {
        out.push((statement, waived));
    }
    out
}

/// The word after `keyword` in `statement`.
fn word_after<'a>(statement: &'a str, keyword: &str) -> Option<&'a str> {
    let i = statement.find(keyword)?;
    statement[i + keyword.len()..]
        .split([' ', '('])
        .find(|w| !w.is_empty() && !["IF", "NOT", "EXISTS", "ONLY", "CONCURRENTLY"].contains(w))
}

/// What in this migration breaks the rules for a running service on big
/// tables (each breach names the statement's beginning).
fn breaches(sql: &str) -> Vec<String> {
    let no_transaction = sql.trim_start().starts_with("-- no-transaction");
    let statements = statements(sql);
    // Tables this migration creates: empty, anything goes on them.
    let created: BTreeSet<String> = statements
        .iter()
        .filter_map(|(s, _)| word_after(s, "CREATE TABLE ").map(str::to_owned))
        .collect();
    let mut found = Vec::new();
    // Whether an earlier statement of this transaction took ACCESS
    // EXCLUSIVE on an existing table (held until the commit).
    let mut locks_exclusively = false;
    for (statement, waived) in &statements {
        let validates = statement.contains("VALIDATE CONSTRAINT");
        if *waived {
            continue;
        }
        let table = word_after(statement, "ALTER TABLE ")
            .or_else(|| word_after(statement, " ON "))
            .or_else(|| word_after(statement, "UPDATE "))
            .or_else(|| word_after(statement, "DELETE FROM "))
            .unwrap_or_default();
        if created.contains(table) {
            continue;
        }
        let head: String = statement.chars().take(60).collect();
        let mut breach = |why: &str| found.push(format!("{why}: {head}"));
        let index = statement.starts_with("CREATE INDEX") || statement.starts_with("CREATE UNIQUE INDEX");
        if index && !statement.contains(" CONCURRENTLY ") {
            breach("an index built without CONCURRENTLY blocks writes for the whole build");
        }
        if statement.contains(" CONCURRENTLY ") && !(no_transaction && statements.len() == 1) {
            breach("CONCURRENTLY needs a `-- no-transaction` migration of this one statement");
        }
        if statement.starts_with("DROP INDEX") && !statement.contains(" CONCURRENTLY ") {
            breach("DROP INDEX without CONCURRENTLY waits for, and blocks, every query on the table");
        }
        if statement.starts_with("ALTER TABLE") {
            if statement.contains(" TYPE ") && statement.contains("ALTER COLUMN") {
                breach("changing a column's type rewrites the table under an exclusive lock");
            }
            if statement.contains("SET NOT NULL") {
                breach("SET NOT NULL scans the table under an exclusive lock, unless a CHECK (... IS NOT NULL) validated by an earlier migration proves it (say so in a waiver)");
            }
            if statement.contains("VALIDATE CONSTRAINT") && !no_transaction && locks_exclusively {
                breach("VALIDATE CONSTRAINT in the transaction of an ALTER that took the exclusive lock scans under that lock; validate in a migration of its own");
            }
            let constraint = statement.contains("ADD CONSTRAINT") || statement.contains(" ADD CHECK");
            let scanned = statement.contains("CHECK") || statement.contains("FOREIGN KEY");
            if constraint && scanned && !statement.contains("NOT VALID") {
                breach("a CHECK or FOREIGN KEY added without NOT VALID scans the table under an exclusive lock");
            }
            if statement.contains("PRIMARY KEY")
                || (statement.contains(" UNIQUE") && !statement.contains("USING INDEX"))
            {
                breach("a primary key or unique constraint builds its index under an exclusive lock; build it concurrently and add it USING INDEX");
            }
            let volatile = [
                "CLOCK_TIMESTAMP()",
                "RANDOM()",
                "GEN_RANDOM_UUID()",
                "NEXTVAL(",
                "TIMEOFDAY()",
            ];
            if statement.contains("ADD COLUMN")
                && (volatile.iter().any(|v| statement.contains(v))
                    || statement.contains("SERIAL")
                    || (statement.contains("GENERATED ALWAYS AS (") && statement.contains("STORED")))
            {
                breach("a column with a volatile default or a stored generated value rewrites the table");
            }
            if statement.contains("RENAME") || statement.contains("DROP COLUMN") {
                breach("the previous release still reads what is renamed or dropped; drop it a release after the code stops using it (with a waiver)");
            }
            if statement.contains("SET TABLESPACE")
                || statement.contains("SET LOGGED")
                || statement.contains("SET UNLOGGED")
            {
                breach("this rewrites the table under an exclusive lock");
            }
        }
        if statement.starts_with("DROP TABLE") {
            breach("the previous release may still use the table; drop it a release later (with a waiver)");
        }
        if (statement.starts_with("UPDATE ") || statement.starts_with("DELETE FROM ")) && !no_transaction {
            breach("a backfill in the migration's transaction locks every row it touches until the end; backfill in batches");
        }
        if ["VACUUM FULL", "CLUSTER", "LOCK TABLE"]
            .iter()
            .any(|k| statement.starts_with(k))
            || (statement.starts_with("REINDEX") && !statement.contains("CONCURRENTLY"))
        {
            breach("this takes an exclusive lock for as long as the table takes");
        }
        locks_exclusively |= statement.starts_with("ALTER TABLE") && !validates;
    }
    found
}

#[test]
fn migrations_after_the_reviewed_ones_are_safe_on_a_running_service() {
    let all = migrations();
    assert!(
        all.iter().any(|m| m.version == LAST_REVIEWED),
        "the last reviewed migration is gone"
    );
    for migration in all.iter().filter(|m| m.version > LAST_REVIEWED) {
        let found = breaches(&migration.sql);
        assert!(
            found.is_empty(),
            "{} breaks the migration rules (docs/operations.md#migrations):\n{}",
            migration.file,
            found.join("\n")
        );
    }

    // The rules catch what they are about: the reviewed migrations that
    // take long locks on a big table are caught, and each is named in
    // docs/operations.md with what it locks.
    let operations = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md")).unwrap();
    let caught: Vec<&Migration> = all
        .iter()
        .filter(|m| m.version <= LAST_REVIEWED && !breaches(&m.sql).is_empty())
        .collect();
    let names: Vec<&str> = caught.iter().map(|m| m.file.as_str()).collect();
    for expected in [
        "20261127000002_trial_soft_alerts.sql",       // a plain CREATE INDEX on usages
        "20261127000003_leaner_writes.sql",           // ALTER COLUMN ... TYPE on outbox
        "20261127000006_c_collation.sql",             // ALTER COLUMN ... TYPE on every table
        "20261128000009_period_alerted.sql",          // a backfill in the transaction
        "20261206000011_amount_limits.sql",           // the primary key of limit_alerts rebuilt
        "20261206000013_period_records.sql",          // plain CREATE INDEX on service_periods
        "20261206000014_period_records_backfill.sql", // a backfill in the transaction
    ] {
        assert!(names.contains(&expected), "{expected} not caught: {names:?}");
    }
    for migration in caught {
        let version = migration.version.to_string();
        assert!(
            operations.contains(&version),
            "docs/operations.md does not say what {} locks",
            migration.file
        );
    }
}

#[test]
fn the_migration_rules_tell_safe_from_unsafe() {
    let unsafe_ones = [
        "CREATE INDEX usages_by_time ON usages (usage_time, id);",
        "-- no-transaction\nCREATE INDEX CONCURRENTLY a ON usages (id);\nCREATE INDEX CONCURRENTLY b ON usages (id);",
        "CREATE INDEX CONCURRENTLY a ON usages (id);",
        "ALTER TABLE usages ALTER COLUMN quantity TYPE numeric(20, 3);",
        "ALTER TABLE usages ALTER COLUMN voided_by SET NOT NULL;",
        "ALTER TABLE usages ADD CONSTRAINT positive CHECK (quantity > 0);",
        "ALTER TABLE usages ADD CONSTRAINT positive CHECK (quantity > 0) NOT VALID;\nALTER TABLE usages VALIDATE CONSTRAINT positive;",
        "ALTER TABLE usages ADD COLUMN token uuid DEFAULT gen_random_uuid();",
        "ALTER TABLE usages ADD PRIMARY KEY (id, subscription_id);",
        "ALTER TABLE usages RENAME COLUMN quantity TO amount;",
        "ALTER TABLE usages DROP COLUMN void_reason;",
        "UPDATE usages SET voided_by = 'kafka' WHERE voided_by IS NULL;",
        "DROP INDEX usage_corrections_by_usage;",
        "VACUUM FULL usages;",
    ];
    for sql in unsafe_ones {
        assert!(!breaches(sql).is_empty(), "taken as safe: {sql}");
    }
    let safe_ones = [
        "-- no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS usages_by_time ON usages (usage_time, id);",
        "ALTER TABLE usages ADD COLUMN note text;",
        "ALTER TABLE usages ADD COLUMN weight numeric NOT NULL DEFAULT 1;",
        "ALTER TABLE usages ADD CONSTRAINT positive CHECK (quantity > 0) NOT VALID;",
        "ALTER TABLE usages VALIDATE CONSTRAINT positive;",
        "-- upgrade-safe: CHECK (voided_by IS NOT NULL) was validated by 20270101000016.\nALTER TABLE usages ALTER COLUMN voided_by SET NOT NULL;",
        "CREATE TABLE notes (id text PRIMARY KEY);\nCREATE INDEX notes_by_id ON notes (id);\nALTER TABLE notes ADD CONSTRAINT c CHECK (id <> '');",
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE usages SET note = 'x'; RETURN NEW; END $$;",
        "-- upgrade-safe: nothing reads it since 20261206000014.\nALTER TABLE usages DROP COLUMN void_reason;",
    ];
    for sql in safe_ones {
        assert_eq!(breaches(sql), Vec::<String>::new(), "taken as unsafe: {sql}");
    }
}

/// Names the previous release's `usage-worker` binary for the rolling
/// deploy test; scripts/rolling-deploy builds it (commit 9662572).
const PREVIOUS_BIN: &str = "USAGE_WORKER_PREVIOUS_BIN";

/// Subscriptions of the rolling deploy, each with this hard limit.
const SUBSCRIPTIONS: usize = 8;
const HARD_LIMIT: i64 = 40;

/// A rolling deploy: the previous release and this one run side by side in
/// one group on the schema this release migrated, both with their HTTP
/// API, while usage events and HTTP reports arrive; then the previous one
/// stops (as the deploy replaces it) and this one goes on alone. Every
/// event gets exactly one outcome, whichever release decided it, and no
/// subscription passes its hard limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the previous release's binary (USAGE_WORKER_PREVIOUS_BIN): run by scripts/rolling-deploy"]
async fn the_previous_release_and_this_one_run_side_by_side() {
    use std::collections::HashMap;
    use std::time::Duration;

    use rust_decimal::Decimal;
    use serde_json::{json, Value};
    use test_kit::postgres::free_port;
    use test_kit::process::{WorkerProcess, WorkerSpec};
    use test_kit::{active_subscription, wait_until, Reader, TestEnv, PARTITIONS};

    let previous = std::env::var(PREVIOUS_BIN).unwrap_or_else(|_| panic!("{PREVIOUS_BIN} names no binary"));
    let env = TestEnv::start().await;
    for s in 0..SUBSCRIPTIONS {
        env.subscription(active_subscription(&format!("sub_{s}"), Some(&HARD_LIMIT.to_string())));
    }
    let vars = env.env_vars(test_kit::env::CONFIG_DIR);
    // The schema as a later release leaves it: a migration this one does
    // not know. The previous release refuses it when it migrates
    // (docs/operations.md#rolling-deploy); this one starts on it.
    applied_by_a_later_release(&env.pool).await;
    let refused = std::process::Command::new(&previous)
        .arg("migrate")
        .envs(vars.iter().cloned())
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "the previous release migrated a later schema"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("previously applied but is missing"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let log = |name: &str| std::env::temp_dir().join(format!("usage-worker-rolling-{}-{name}.log", std::process::id()));
    let start = |exe: &str, name: &str, port: u16, migrate: bool| -> WorkerProcess {
        WorkerSpec::with_env(exe, vars.clone(), log(name))
            .set("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .set("USAGE_WORKER__DATABASE__MIGRATE_ON_START", migrate.to_string())
            .spawn()
            .unwrap()
    };
    let (old_port, new_port) = (free_port().unwrap(), free_port().unwrap());
    let mut old = start(&previous, "previous", old_port, false);
    let mut new = start(env!("CARGO_BIN_EXE_usage-worker"), "this", new_port, true);
    let client = reqwest::Client::new();
    for port in [old_port, new_port] {
        wait_until("both releases ready", || {
            let client = client.clone();
            async move {
                let url = format!("http://127.0.0.1:{port}/readyz");
                client.get(url).send().await.is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
    }
    wait_until("the partitions shared between the two", || {
        let shared = old.assignment().is_some_and(|a| a != "[]") && new.assignment().is_some_and(|a| a != "[]");
        async move { shared }
    })
    .await;

    // Events and HTTP reports while both run, then while the previous
    // release shuts down, then with this one alone.
    let mut sent = Vec::new();
    let mut created_over_http: HashMap<String, (usize, Decimal)> = HashMap::new();
    let mut old_created = 0;
    let results = Reader::new(env.kafka.bootstrap_servers(), "usage-results", PARTITIONS);
    let mut outcomes: HashMap<String, Vec<Value>> = HashMap::new();
    for round in 0..3 {
        for i in 0..150 {
            let id = format!("ev_{round}_{i}");
            let sub = i % SUBSCRIPTIONS;
            env.usage(json!({"id": id, "subscriptionId": format!("sub_{sub}"), "quantity": 1}));
            sent.push(id);
        }
        env.flush();
        for i in 0..20 {
            let port = if round == 0 && i % 2 == 0 { old_port } else { new_port };
            let id = format!("http_{round}_{i}");
            let sub = i % SUBSCRIPTIONS;
            let body = json!({"id": id, "subscriptionId": format!("sub_{sub}"), "quantity": 1});
            let status = loop {
                let answer = client
                    .post(format!("http://127.0.0.1:{port}/usages"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                match answer.status().as_u16() {
                    // Retried with the same id: found if it was stored.
                    503 => tokio::time::sleep(Duration::from_millis(100)).await,
                    status => break status,
                }
            };
            assert!([201, 409].contains(&status), "{id}: {status}");
            if status == 201 {
                old_created += usize::from(port == old_port);
                created_over_http.insert(id, (sub, Decimal::ONE));
            }
        }
        if round == 0 {
            // Both releases decided: the previous one answered HTTP reports,
            // and every event of this round has its outcome before it stops.
            assert!(old_created > 0, "the previous release created nothing over HTTP");
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !sent.iter().all(|id| outcomes.contains_key(id)) {
                assert!(std::time::Instant::now() < deadline, "the first round was not decided");
                for record in results.read_rest(Duration::from_millis(500)) {
                    let id = record.value["eventId"].as_str().unwrap().to_owned();
                    outcomes.entry(id).or_default().push(record.value);
                }
            }
            // The deploy replaces the previous release: SIGTERM, as an
            // orchestrator stops a container.
            let status = old.terminate(Duration::from_secs(40)).unwrap();
            assert!(
                status.is_some_and(|s| s.success()),
                "the previous release stopped cleanly"
            );
        }
    }
    new.check_running().unwrap();

    // Exactly one outcome for each event.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        for record in results.read_rest(Duration::from_secs(2)) {
            let id = record.value["eventId"].as_str().unwrap().to_owned();
            outcomes.entry(id).or_default().push(record.value);
        }
        let all = sent
            .iter()
            .chain(created_over_http.keys())
            .all(|id| outcomes.contains_key(id));
        if all {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not every event was decided");
    }
    // A second outcome of any, had one come late.
    for record in results.read_rest(Duration::from_secs(3)) {
        let id = record.value["eventId"].as_str().unwrap().to_owned();
        outcomes.entry(id).or_default().push(record.value);
    }
    let mut used = [Decimal::ZERO; SUBSCRIPTIONS];
    for id in &sent {
        let theirs = outcomes.get(id).map_or(0, Vec::len);
        assert_eq!(theirs, 1, "{id} has {theirs} outcomes");
        let outcome = &outcomes[id][0];
        let sub: usize = outcome["subscriptionId"].as_str().unwrap()[4..].parse().unwrap();
        match outcome["status"].as_str().unwrap() {
            "created" => used[sub] += Decimal::ONE,
            "rejected" => assert_eq!(outcome["error"]["code"], "usage_limit_exceeded", "{outcome}"),
            other => panic!("{id}: {other}"),
        }
    }
    for (id, (sub, quantity)) in &created_over_http {
        let created: Vec<&Value> = outcomes[id].iter().filter(|o| o["status"] == "created").collect();
        assert_eq!(created.len(), 1, "{id}");
        used[*sub] += quantity;
    }
    // No subscription past its limit, and the limit reached: the test
    // decided enough to be at the edge.
    for (sub, used) in used.iter().enumerate() {
        assert_eq!(*used, Decimal::from(HARD_LIMIT), "sub_{sub}");
        let stored: Decimal = sqlx::query_scalar("SELECT used FROM service_periods WHERE subscription_id = $1")
            .bind(format!("sub_{sub}"))
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(stored, *used, "sub_{sub}");
    }
    new.terminate(Duration::from_secs(40)).unwrap();
    for name in ["previous", "this"] {
        let _ = std::fs::remove_file(log(name));
    }
}

/// Records a migration no release of this repository has, as a later
/// release would leave it applied.
async fn applied_by_a_later_release(pool: &sqlx::PgPool) {
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'a later release', true, '\\x00', 1)",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_release_starts_on_a_schema_a_later_release_migrated() {
    let env = test_kit::TestEnv::start().await;
    applied_by_a_later_release(&env.pool).await;
    usage_worker::store::migrate(&env.pool)
        .await
        .expect("a migration of a later release does not stop this one");
    // One of its own that differs from what was applied still does.
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = $1")
        .bind(LAST_REVIEWED)
        .execute(&env.pool)
        .await
        .unwrap();
    let err = usage_worker::store::migrate(&env.pool).await.unwrap_err();
    assert!(format!("{err:#}").contains(&LAST_REVIEWED.to_string()), "{err:#}");
}
