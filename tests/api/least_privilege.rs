//! Least privilege as a recipe, run for real (docs/deployment-database.md "Roles"): on a
//! cluster of the test's own, an Azure-like admin (CREATEROLE, owner of the database, not a
//! superuser) applies `deploy/sql/roles.sql`; `reachly-ingest migrate` and `maintain` run as
//! `reachly_owner`; `reachly-ingest serve` runs as `reachly_app` (no BYPASSRLS, owns
//! nothing) and stores a pixel, a click, a bounce webhook and a dead letter, in today's
//! partition made by `maintain`. Also: V1 on a database whose `auth.users` belongs to another
//! role (Supabase).

use std::time::Duration;

use reachly_ingest::token::Purpose;
use uuid::Uuid;

use crate::helpers::*;

const ROLES_SQL: &str = include_str!("../../deploy/sql/roles.sql");
const POSTMARK_AUTH: &str = "hook:least privilege";

#[tokio::test]
async fn the_app_role_stores_everything_without_bypassrls_in_partitions_made_by_the_owner() {
    let _heavy = heavy_test_guard().await;
    let c = private_unmigrated_cluster("least-priv").await;
    let su = connect(&c.url("postgres")).await;
    // Azure-like: the admin creates roles, owns the database, is no superuser.
    su.batch_execute("CREATE ROLE azure_admin LOGIN CREATEROLE CREATEDB")
        .await
        .expect("admin");
    su.batch_execute("CREATE DATABASE reachly OWNER azure_admin")
        .await
        .expect("database");
    let admin = connect(&as_user(&c, "azure_admin", "reachly")).await;
    admin
        .batch_execute(ROLES_SQL)
        .await
        .expect("roles.sql, first run");

    // The app role cannot migrate: serve says what to do instead, and exits.
    let spool = temp_dir("spool-lp");
    let app_url = as_user(&c, "reachly_app", "reachly");
    let keys = test_token_keys_arg();
    let base_env = |url: &str| {
        vec![
            ("DATABASE_URL", url.to_string()),
            ("REACHLY_TOKEN_KEYS", keys.clone()),
            ("REACHLY_LISTEN", "127.0.0.1:0".into()),
            ("REACHLY_ADMIN_LISTEN", "127.0.0.1:0".into()),
            ("REACHLY_SPOOL_DIR", spool.display().to_string()),
        ]
    };
    let first_env = base_env(&app_url);
    let env: Vec<(&str, &str)> = first_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, _, err) = run_binary(&["serve"], &env).await;
    assert_ne!(code, Some(0), "serve cannot migrate as reachly_app: {err}");
    assert!(err.contains("42501"), "the reason with its SQLSTATE: {err}");
    assert!(err.contains("REACHLY_MIGRATE_ON_START=false"), "{err}");

    // The owner migrates; the admin grants; the owner makes the partitions.
    let owner_url = as_user(&c, "reachly_owner", "reachly");
    let (code, out, err) = run_binary(&["migrate"], &[("DATABASE_URL", &owner_url)]).await;
    assert_eq!(code, Some(0), "migrate as owner: {out}{err}");
    admin
        .batch_execute(ROLES_SQL)
        .await
        .expect("roles.sql, after migrate");
    // The app role cannot maintain; it says why.
    let (code, out, err) = run_binary(&["maintain"], &[("DATABASE_URL", &app_url)]).await;
    assert_ne!(code, Some(0), "maintain as reachly_app: {out}{err}");
    assert!(err.contains("42501"), "{err}");
    let (code, out, err) = run_binary(&["maintain"], &[("DATABASE_URL", &owner_url)]).await;
    assert_eq!(code, Some(0), "maintain as owner: {out}{err}");
    let today = reachly_ingest::db::partitions::partition_name(chrono::Utc::now().date_naive());
    assert!(out.contains(&today), "{out}");

    // The app role: no BYPASSRLS, no ownership, no superuser.
    let row = su
        .query_one(
            "SELECT rolbypassrls, rolsuper FROM pg_roles WHERE rolname = 'reachly_app'",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0) && !row.get::<_, bool>(1));

    // Tenants are made by the platform (here: the superuser).
    let db = connect(&c.url("reachly")).await;
    let s = seed_tenant(&db).await;
    let bounced = seed_message_in(&db, &s).await;

    let mut env = base_env(&app_url);
    env.push(("REACHLY_PARTITION_MAINTENANCE", "off".into()));
    env.push(("REACHLY_POSTMARK_BASIC_AUTH", POSTMARK_AUTH.into()));
    env.push(("REACHLY_FLUSH_INTERVAL_MS", "20".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Default REACHLY_MIGRATE_ON_START=true: the schema is current, so nothing is attempted.
    let serve = ServeProcess::spawn(&app_url, &spool, &env);
    serve.wait_admin_ok("/readyz").await;

    let http = http_client();
    let keys = test_token_keys();
    let open = reachly_ingest::token::mint(&keys, Purpose::Open, s.org, s.message, None).unwrap();
    let click = reachly_ingest::token::mint(
        &keys,
        Purpose::Click,
        s.org,
        s.message,
        Some("https://example.com/x"),
    )
    .unwrap();
    let r = http
        .get(serve.url(&format!("/o/{open}.gif")))
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(serve.url(&format!("/c/{click}")))
        .header("user-agent", BROWSER_UA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);

    let auth = basic_auth(POSTMARK_AUTH);
    for (org, msg) in [(s.org, bounced.message), (s.org, Uuid::new_v4())] {
        let r = http
            .post(serve.url("/webhooks/postmark"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(postmark_bounce(org, msg))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    // Everything is stored, in today's partition, none in the default one.
    wait_for_count(&db, "SELECT count(*) FROM email_events", 3).await;
    let parts: Vec<String> = db
        .query(
            "SELECT DISTINCT tableoid::regclass::text FROM email_events",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(parts, std::slice::from_ref(&today));
    assert_eq!(
        message_row(&db, bounced.message).await.status.as_deref(),
        Some("bounced")
    );
    let contact: String = db
        .query_one(
            "SELECT status FROM contacts WHERE id = $1",
            &[&bounced.contact],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(contact, "bounced");
    assert_eq!(
        message_row(&db, s.message).await.status.as_deref(),
        Some("clicked")
    );
    wait_for_count(
        &db,
        "SELECT count(*) FROM webhook_dead_letters WHERE reason = 'unknown_message'",
        1,
    )
    .await;

    // ... and the app role could not have made that partition itself.
    let app_db = connect(&app_url).await;
    let e = app_db
        .batch_execute("CREATE TABLE public.x_probe (i int)")
        .await
        .expect_err("the app role cannot create tables");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );

    let log = serve.log.lock().map(|l| l.join("\n")).unwrap_or_default();
    assert!(!log.contains("batch write failed"), "{log}");
    assert!(log.contains("no migration to apply"), "{log}");
    assert!(log.contains("partition maintenance is off"), "{log}");
    assert!(
        !log.contains("partition maintenance at start failed"),
        "{log}"
    );
    serve.signal("-TERM");
    assert_eq!(serve.wait(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test]
async fn an_invalid_partition_maintenance_setting_is_one_line_and_exit_64() {
    let (code, _, err) = run_binary(
        &["serve", "--database-url", "host=x"],
        &[("REACHLY_PARTITION_MAINTENANCE", "sometimes")],
    )
    .await;
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("partition-maintenance"), "{err}");
}

#[tokio::test]
async fn v1_applies_where_auth_users_belongs_to_another_role() {
    let _heavy = heavy_test_guard().await;
    let c = private_unmigrated_cluster("supabase").await;
    let su = connect(&c.url("postgres")).await;
    su.batch_execute("CREATE ROLE supabase_auth_admin NOLOGIN; CREATE ROLE migrator LOGIN")
        .await
        .unwrap();
    su.batch_execute("CREATE DATABASE reachly").await.unwrap();
    let db = connect(&c.url("reachly")).await;
    // As on Supabase: auth and auth.users belong to supabase_auth_admin; the migrating role
    // may use and reference them but not create in auth.
    db.batch_execute(
        "CREATE SCHEMA auth AUTHORIZATION supabase_auth_admin; \
         SET ROLE supabase_auth_admin; \
         CREATE TABLE auth.users (id uuid PRIMARY KEY, email text, instance_id uuid); \
         RESET ROLE; \
         REVOKE CREATE ON SCHEMA auth FROM PUBLIC, migrator; \
         GRANT USAGE ON SCHEMA auth TO migrator; \
         GRANT REFERENCES, SELECT ON auth.users TO migrator; \
         GRANT CREATE ON DATABASE reachly TO migrator; \
         GRANT USAGE, CREATE ON SCHEMA public TO migrator;",
    )
    .await
    .expect("supabase-like auth schema");
    let url = as_user(&c, "migrator", "reachly");
    let probe = connect(&url).await;
    let e = probe
        .batch_execute("CREATE TABLE IF NOT EXISTS auth.users (id uuid)")
        .await
        .expect_err("the migrator cannot create in auth");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );

    let (code, out, err) = run_binary(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert_eq!(code, Some(0), "migrate: {out}{err}");
    // auth.users is untouched (its own columns), the service's tables reference it.
    let cols: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'auth' AND table_name = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cols, 3);
    let fk: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.organization_members'::regclass \
             AND confrelid = 'auth.users'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fk >= 1);
    // V1 is recorded under its real checksum: a second run finds nothing to do.
    let (code, out, err) = run_binary(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert_eq!(code, Some(0), "second migrate: {out}{err}");
    assert!(out.contains("migrations applied: 0"), "{out}");
    let pending = reachly_ingest::db::migrate::pending(&probe).await.unwrap();
    assert!(pending.is_empty(), "{pending:?}");
}
