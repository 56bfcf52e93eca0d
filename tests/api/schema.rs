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

/// V11: one foreign key (organization_id, message_id) -> campaign_messages replaces the two
/// single-column ones; the database refuses an event filed under another tenant than its
/// message's, and deleting a message or an organization still deletes its events.
#[tokio::test]
async fn an_event_must_carry_its_messages_tenant_and_goes_with_its_message() {
    let app = spawn_app().await;
    let a = app.seed().await;
    let b = app.seed().await;
    let insert = "INSERT INTO email_events (organization_id, message_id, event_type) VALUES ($1, $2, 'opened')";
    let err = app
        .db
        .execute(insert, &[&b.org, &a.message])
        .await
        .expect_err("an event under tenant B for tenant A's message");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err:?}"
    );
    let err = app
        .db
        .execute(insert, &[&a.org, &Uuid::new_v4()])
        .await
        .expect_err("an event for a message that does not exist");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err:?}"
    );
    let keys: Vec<String> = app
        .db
        .query(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = 'public.email_events'::regclass AND contype = 'f' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        keys,
        [
            "FOREIGN KEY (organization_id, message_id) REFERENCES campaign_messages(organization_id, id) ON DELETE CASCADE"
        ],
        "one foreign key per event row"
    );
    for s in [&a, &b] {
        app.db
            .execute(insert, &[&s.org, &s.message])
            .await
            .expect("an event under its message's tenant");
    }
    app.db
        .execute("DELETE FROM campaign_messages WHERE id = $1", &[&a.message])
        .await
        .unwrap();
    app.db
        .execute("DELETE FROM organizations WHERE id = $1", &[&b.org])
        .await
        .unwrap();
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        0,
        "a deleted message's and a deleted organization's events are gone"
    );
}

/// V12: the ESP deduplication index leads with the event time (inserts near its right
/// edge) and keeps its rule: the same ESP key at the same time is one event, the writer's
/// ON CONFLICT DO NOTHING skips the repeat, events without a key have no entry.
#[tokio::test]
async fn the_dedup_index_leads_with_the_time_and_still_refuses_a_repeated_esp_event() {
    let app = spawn_app().await;
    let a = app.seed().await;
    let def: String = app
        .db
        .query_one(
            "SELECT pg_get_indexdef('public.idx_events_dedup'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        def.contains("UNIQUE INDEX idx_events_dedup ON ONLY public.email_events USING btree (created_at, dedup_key) WHERE (dedup_key IS NOT NULL)"),
        "{def}"
    );
    let insert = "INSERT INTO email_events (organization_id, message_id, event_type, created_at, dedup_key) \
                  VALUES ($1, $2, 'delivered', '2026-12-07 10:00:00+00', $3)";
    let key = Some("sendgrid:evt-1");
    app.db
        .execute(insert, &[&a.org, &a.message, &key])
        .await
        .expect("first delivery");
    let err = app
        .db
        .execute(insert, &[&a.org, &a.message, &key])
        .await
        .expect_err("the same ESP event again");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{err:?}"
    );
    let skipped = app
        .db
        .execute(
            &format!("{insert} ON CONFLICT DO NOTHING"),
            &[&a.org, &a.message, &key],
        )
        .await
        .unwrap();
    assert_eq!(skipped, 0, "the writer's ON CONFLICT DO NOTHING skips it");
    let no_key: Option<&str> = None;
    for _ in 0..2 {
        app.db
            .execute(insert, &[&a.org, &a.message, &no_key])
            .await
            .expect("events without a key are never conflicts");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM email_events").await,
        3,
        "one keyed event and two without a key"
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

/// Every relation with an `organization_id` column (tables, partitioned tables, every
/// partition of email_events), oldest first.
async fn tenant_relations(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT c.oid::regclass::text FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attname = 'organization_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY c.oid",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn tenant_rows(db: &tokio_postgres::Client, s: &Seeded, tag: &str) {
    let user = Uuid::new_v4();
    db.execute(
        "INSERT INTO auth.users (id, email, password_hash) VALUES ($1, $2, 'x')",
        &[&user, &format!("{tag}-{}@example.com", user.simple())],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO organization_members (organization_id, user_id) VALUES ($1, $2)",
        &[&s.org, &user],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO contact_lists (organization_id, name) VALUES ($1, $2)",
        &[&s.org, &tag],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO email_templates (organization_id, name) VALUES ($1, $2)",
        &[&s.org, &tag],
    )
    .await
    .unwrap();
    // Events today (a partition made at start), far in the future (the default partition)
    // and on a day whose partition maintenance makes later in the test.
    for at in [
        "now()",
        "'2031-06-15 12:00:00+00'",
        "'2032-01-01 08:00:00+00'",
    ] {
        db.execute(
            &format!(
                "INSERT INTO email_events (organization_id, message_id, event_type, created_at) \
                 VALUES ($1, $2, 'opened', {at})"
            ),
            &[&s.org, &s.message],
        )
        .await
        .unwrap();
    }
    db.execute(
        "INSERT INTO webhook_dead_letters (provider, reason, organization_id, message_id, payload) \
         VALUES ('sendgrid', 'test', $1, $2, '{}')",
        &[&s.org, &s.message],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn every_relation_with_tenant_rows_partitions_included_shows_a_tenant_only_its_own() {
    let app = spawn_app().await;
    let owner = connect(&app.db_url).await;
    let role = format!("tenant_{}", Uuid::new_v4().simple());
    // Supabase-style grants: SELECT on every table there is, and on every table made later.
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN NOBYPASSRLS; \
             GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; \
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {role};"
        ))
        .await
        .unwrap();
    let a = app.seed().await;
    let b = app.seed().await;
    // Partitions maintenance makes now, after the grants (the app made today's at start).
    let mut maint = connect(&app.db_url).await;
    let made = loop {
        let r = reachly_ingest::db::partitions::maintain(
            &mut maint,
            chrono::NaiveDate::from_ymd_opt(2032, 1, 1).unwrap(),
            1,
            4000,
        )
        .await
        .unwrap();
        if !r.skipped {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        made.created.contains(&"email_events_p20320101".to_string()),
        "{made:?}"
    );
    tenant_rows(&owner, &a, "a").await;
    tenant_rows(&owner, &b, "b").await;

    let relations = tenant_relations(&owner).await;
    let today = reachly_ingest::db::partitions::partition_name(chrono::Utc::now().date_naive());
    for must in [
        "email_events",
        "email_events_default",
        today.as_str(),
        "email_events_p20320101",
        "campaign_messages",
        "contacts",
        "webhook_dead_letters",
        "organization_members",
    ] {
        assert!(
            relations.iter().any(|r| r == must),
            "{must} in {relations:?}"
        );
    }
    let mut leaks = Vec::new();
    let mut checked_with_both = 0;
    for rel in &relations {
        for (me, other) in [(&a, &b), (&b, &a)] {
            let as_owner = owner
                .query_one(
                    &format!(
                        "SELECT count(*) FILTER (WHERE organization_id = $1), \
                                count(*) FILTER (WHERE organization_id = $2) FROM {rel}"
                    ),
                    &[&me.org, &other.org],
                )
                .await
                .unwrap();
            let (mine, theirs): (i64, i64) = (as_owner.get(0), as_owner.get(1));
            if mine > 0 && theirs > 0 {
                checked_with_both += 1;
            }
            let tenant = connect(&app.db_url).await;
            tenant
                .execute(&format!("SET ROLE {role}"), &[])
                .await
                .unwrap();
            tenant
                .execute(
                    "SELECT set_config('app.current_organization_id', $1, false)",
                    &[&me.org.to_string()],
                )
                .await
                .unwrap();
            let seen = tenant
                .query_one(
                    &format!(
                        "SELECT count(*), count(*) FILTER (WHERE organization_id IS DISTINCT FROM $1) FROM {rel}"
                    ),
                    &[&me.org],
                )
                .await
                .unwrap_or_else(|e| panic!("{rel}: {e:?}"));
            let (all, foreign): (i64, i64) = (seen.get(0), seen.get(1));
            if foreign != 0 || all != mine {
                leaks.push(format!(
                    "{rel}: sees {all} rows, {foreign} not its own (owns {mine})"
                ));
            }
        }
    }
    assert!(leaks.is_empty(), "tenant isolation broken: {leaks:#?}");
    // Not vacuous: the tables above and the three partitions hold rows of both tenants.
    assert!(
        checked_with_both >= 2 * 11,
        "only {checked_with_both} (relation, tenant) pairs had rows of both tenants"
    );
}

#[tokio::test]
async fn the_startup_check_refuses_a_schema_without_the_partition_security_function() {
    let db = connect(&fresh_database().await).await;
    reachly_ingest::db::check_schema(&db)
        .await
        .expect("a migrated schema passes");
    db.batch_execute("DROP FUNCTION public.reachly_secure_tenant_relation(regclass)")
        .await
        .unwrap();
    let err = reachly_ingest::db::check_schema(&db)
        .await
        .expect_err("the function is missing");
    let text = format!("{err:#}");
    assert!(
        text.contains("reachly_secure_tenant_relation") && text.contains("reachly-ingest migrate"),
        "{text}"
    );
}
