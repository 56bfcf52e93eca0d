//! Migrations and the schema they make: idempotent, safe concurrently, every seed table,
//! index and policy present, and row-level security isolating tenants.

use crate::helpers::*;
use uuid::Uuid;

const SEED_TABLES: [&str; 11] = [
    "organizations",
    "organization_members",
    "profiles",
    "contacts",
    "contact_lists",
    "contact_list_members",
    "email_templates",
    "campaigns",
    "campaign_lists",
    "campaign_messages",
    "email_events",
];

/// Seed indexes dropped on purpose, each with its reason in the migration: V3
/// (`V3__write_amplification.sql`, measured) and V4 (duplicates of the contacts unique index).
const DROPPED_SEED_INDEXES: [&str; 4] = [
    "idx_messages_status",
    "idx_events_org_id",
    "idx_contacts_email",
    "idx_contacts_org_id",
];

const SEED_INDEXES: [&str; 21] = [
    "idx_org_members_org_id",
    "idx_org_members_user_id",
    "idx_org_members_status",
    "idx_contacts_org_id",
    "idx_contacts_email",
    "idx_contacts_status",
    "idx_contact_lists_org_id",
    "idx_list_members_list_id",
    "idx_list_members_contact_id",
    "idx_templates_org_id",
    "idx_templates_archived",
    "idx_campaigns_org_id",
    "idx_campaigns_status",
    "idx_campaigns_scheduled",
    "idx_messages_campaign_id",
    "idx_messages_contact_id",
    "idx_messages_status",
    "idx_events_org_id",
    "idx_events_message_id",
    "idx_events_type",
    "idx_events_created",
];

/// Tenant tables: RLS on, with a policy.
const TENANT_TABLES: [&str; 11] = [
    "organizations",
    "organization_members",
    "contacts",
    "contact_lists",
    "contact_list_members",
    "email_templates",
    "campaigns",
    "campaign_lists",
    "campaign_messages",
    "email_events",
    "webhook_dead_letters",
];

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_again_as_a_no_op() {
    let url = empty_database().await;
    let first = reachly_ingest::db::migrate::run(&url)
        .await
        .expect("first run");
    assert!(first >= 2, "expected every migration applied, got {first}");
    let second = reachly_ingest::db::migrate::run(&url)
        .await
        .expect("second run");
    assert_eq!(second, 0, "a second run must apply nothing");
}

#[tokio::test]
async fn two_concurrent_migrate_runs_both_succeed() {
    let url = empty_database().await;
    let (a, b) = tokio::join!(
        reachly_ingest::db::migrate::run(&url),
        reachly_ingest::db::migrate::run(&url)
    );
    let (a, b) = (a.expect("run a"), b.expect("run b"));
    assert!(
        a + b >= 2 && (a == 0 || b == 0),
        "one run applies, the other finds it done: {a} {b}"
    );
}

#[tokio::test]
async fn the_migrate_subcommand_migrates_an_empty_database() {
    let url = empty_database().await;
    let out = std::process::Command::new(binary())
        .args(["migrate"])
        .env("DATABASE_URL", &url)
        .output()
        .expect("run binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = connect(&url).await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 2);
}

#[tokio::test]
async fn the_schema_has_every_seed_table_index_and_policy() {
    let db = connect(&fresh_database().await).await;
    for t in SEED_TABLES {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relname = $1 AND c.relkind IN ('r', 'p')",
                &[&t],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "table {t} missing");
    }
    // What the dropped contacts indexes served is still served: by the unique constraint.
    let unique: String = db
        .query_one(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
             WHERE i.indrelid = 'public.contacts'::regclass AND i.indisunique AND NOT i.indisprimary",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(unique.ends_with("(organization_id, email)"), "{unique}");
    let users: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'auth' AND tablename = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1, "auth.users");
    for i in SEED_INDEXES {
        let expected = if DROPPED_SEED_INDEXES.contains(&i) {
            0
        } else {
            1
        };
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname = $1 AND relkind IN ('i', 'I')",
                &[&i],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, expected, "index {i}: present {n}, expected {expected}");
    }
    for t in TENANT_TABLES {
        let row = db
            .query_one(
                "SELECT c.relrowsecurity, (SELECT count(*) FROM pg_policies p WHERE p.schemaname = 'public' AND p.tablename = c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname = $1",
                &[&t],
            )
            .await
            .unwrap_or_else(|e| panic!("{t}: {e}"));
        let (rls, policies): (bool, i64) = (row.get(0), row.get(1));
        assert!(rls, "RLS not enabled on {t}");
        assert!(policies >= 1, "no policy on {t}");
    }
    // email_events: partitioned by range on created_at, key (id, created_at), types checked.
    let strategy: String = db
        .query_one(
            "SELECT p.partstrat::text FROM pg_partitioned_table p WHERE p.partrelid = 'public.email_events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(strategy, "r");
    let pk: String = db
        .query_one("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'public.email_events'::regclass AND contype = 'p'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pk, "PRIMARY KEY (id, created_at)");
    let default_partition: i64 = db
        .query_one("SELECT count(*) FROM pg_class WHERE relname = 'email_events_default' AND relispartition", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default_partition, 1);
    let org_col: String = db
        .query_one(
            "SELECT is_nullable FROM information_schema.columns WHERE table_name = 'campaign_messages' AND column_name = 'organization_id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(org_col, "NO");
}

#[tokio::test]
async fn an_event_type_outside_the_spec_is_refused_by_the_database() {
    let app = spawn_app().await;
    let s = app.seed().await;
    let err = app
        .db
        .execute(
            "INSERT INTO email_events (organization_id, message_id, event_type) VALUES ($1, $2, 'exploded')",
            &[&s.org, &s.message],
        )
        .await
        .expect_err("check constraint");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
        "{err:?}"
    );
}

#[tokio::test]
async fn row_level_security_shows_a_tenant_only_its_own_rows() {
    let app = spawn_app().await;
    let a = app.seed().await;
    let b = app.seed().await;
    for s in [&a, &b] {
        app.db
            .execute(
                "INSERT INTO email_events (organization_id, message_id, event_type) VALUES ($1, $2, 'opened')",
                &[&s.org, &s.message],
            )
            .await
            .unwrap();
    }
    let role = format!("tenant_reader_{}", Uuid::new_v4().simple());
    app.db
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN NOBYPASSRLS; \
             GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT ON email_events, contacts, campaign_messages TO {role}; \
             GRANT EXECUTE ON FUNCTION reachly_current_org() TO {role};"
        ))
        .await
        .unwrap();
    let count = |table: &'static str| {
        let db = &app.db;
        async move {
            db.query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE organization_id <> '{}') FROM {table}",
                    a.org
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"))
        }
    };
    app.db
        .batch_execute(&format!(
            "SET ROLE {role}; SET app.current_organization_id = '{}'",
            a.org
        ))
        .await
        .unwrap();
    for t in ["email_events", "contacts", "campaign_messages"] {
        let r = count(t).await;
        let (all, foreign): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!((all, foreign), (1, 0), "{t} as org A");
    }
    app.db
        .batch_execute("RESET app.current_organization_id")
        .await
        .unwrap();
    for t in ["email_events", "contacts", "campaign_messages"] {
        let all: i64 = count(t).await.get(0);
        assert_eq!(all, 0, "{t} with no organization set");
    }
    app.db.batch_execute("RESET ROLE").await.unwrap();
    let all: i64 = count("email_events").await.get(0);
    assert_eq!(all, 2, "the owner (the service) sees every tenant");
}
