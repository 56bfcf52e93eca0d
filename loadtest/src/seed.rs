//! The tenant mix and the reset between phases.
//!
//! Five organizations of unequal size (40/25/15/12/8% of the contacts), each with two to four
//! sent campaigns addressed to overlapping slices of its contacts, so the number of messages
//! is about twice the number of contacts (120k contacts give ~250k messages). Everything is
//! written with binary COPY. A pristine copy of `campaign_messages` is kept in schema
//! `loadtest`, and [`reset`] brings the database back to that shape between phases (no
//! events, every message `sent`, every contact `active`), then vacuums and checkpoints so
//! each phase starts from the same state.

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

/// Share of the contacts of each organization.
const ORG_SHARES: [f64; 5] = [0.40, 0.25, 0.15, 0.12, 0.08];
const ORG_NAMES: [&str; 5] = [
    "Northwind Outfitters",
    "Bluebird Analytics",
    "Cedar & Pine Realty",
    "Dovetail Studio",
    "Ember Coffee Roasters",
];
/// Per organization: the share of its contacts each of its campaigns was sent to.
const CAMPAIGN_REACH: [&[f64]; 5] = [
    &[0.9, 0.6, 0.5, 0.4],
    &[0.9, 0.6, 0.5],
    &[1.0, 0.6, 0.4],
    &[0.9, 0.6],
    &[0.9, 0.6],
];

#[derive(Debug, Clone)]
pub struct Org {
    pub id: Uuid,
    pub domain: String,
}

#[derive(Debug, Clone)]
pub struct Campaign {
    pub id: Uuid,
    pub org: usize,
    pub slug: String,
}

/// One campaign message, as the load generator needs it.
#[derive(Debug, Clone, Copy)]
pub struct Message {
    pub id: Uuid,
    pub org: u8,
    pub campaign: u16,
    /// Index of the contact within its organization (its e-mail address derives from it).
    pub contact: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Tenants {
    pub orgs: Vec<Org>,
    pub campaigns: Vec<Campaign>,
    pub messages: Vec<Message>,
    pub contacts: usize,
}

impl Tenants {
    pub fn org_id(&self, m: &Message) -> Uuid {
        self.orgs[m.org as usize].id
    }

    pub fn email(&self, m: &Message) -> String {
        contact_email(m.contact as usize, &self.orgs[m.org as usize].domain)
    }
}

fn contact_email(i: usize, domain: &str) -> String {
    const FIRST: [&str; 8] = [
        "ada", "grace", "linus", "ken", "barbara", "edsger", "margaret", "alan",
    ];
    format!("{}.{i}@{domain}", FIRST[i % FIRST.len()])
}

/// Seeds `contacts` contacts (and about twice as many messages); returns what the generator
/// needs. The database must be migrated and empty.
pub async fn seed(url: &str, contacts: usize) -> anyhow::Result<Tenants> {
    let mut client = reachly_ingest::db::connect(url).await?;
    let now = Utc::now();
    let mut t = Tenants {
        contacts,
        ..Default::default()
    };
    let tx = client.transaction().await?;
    for (i, name) in ORG_NAMES.iter().enumerate() {
        let id = Uuid::now_v7();
        let slug = name
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>();
        tx.execute(
            "INSERT INTO public.organizations (id, name, slug, industry, size) VALUES ($1, $2, $3, 'retail', 'smb')",
            &[&id, name, &slug],
        )
        .await?;
        t.orgs.push(Org {
            id,
            domain: format!("{slug}-customers.example"),
        });
        for (k, _) in CAMPAIGN_REACH[i].iter().enumerate() {
            let cid = Uuid::now_v7();
            let cslug = format!("{slug}-c{k}");
            tx.execute(
                "INSERT INTO public.campaigns (id, organization_id, name, subject, from_name, from_email, status, sent_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'sent', $7)",
                &[
                    &cid,
                    &id,
                    &format!("{name} newsletter #{}", k + 1),
                    &format!("News from {name}"),
                    name,
                    &format!("news@{slug}.example"),
                    &(now - Duration::hours(6)),
                ],
            )
            .await?;
            t.campaigns.push(Campaign {
                id: cid,
                org: i,
                slug: cslug,
            });
        }
    }

    // Contacts, per organization.
    let per_org: Vec<usize> = ORG_SHARES
        .iter()
        .map(|s| ((contacts as f64 * s).round() as usize).max(1))
        .collect();
    let mut contact_ids: Vec<Vec<Uuid>> = Vec::with_capacity(per_org.len());
    {
        let sink = tx
            .copy_in(
                "COPY public.contacts (id, organization_id, email, first_name, status, source) FROM STDIN (FORMAT binary)",
            )
            .await?;
        let types = [
            Type::UUID,
            Type::UUID,
            Type::VARCHAR,
            Type::VARCHAR,
            Type::VARCHAR,
            Type::VARCHAR,
        ];
        let w = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(w);
        for (o, n) in per_org.iter().enumerate() {
            let org = &t.orgs[o];
            let mut ids = Vec::with_capacity(*n);
            for i in 0..*n {
                let id = Uuid::now_v7();
                let email = contact_email(i, &org.domain);
                let first = email.split('.').next().unwrap_or("x").to_string();
                let row: [&(dyn ToSql + Sync); 6] =
                    [&id, &org.id, &email, &first, &"active", &"import"];
                w.as_mut().write(&row).await?;
                ids.push(id);
            }
            contact_ids.push(ids);
        }
        w.finish().await?;
    }

    // Messages: campaign k of an organization reaches a slice of its contacts, starting at a
    // different offset for each campaign (so contacts get one to four messages).
    {
        let sink = tx
            .copy_in(
                "COPY public.campaign_messages (id, organization_id, campaign_id, contact_id, status, sent_at) FROM STDIN (FORMAT binary)",
            )
            .await?;
        let types = [
            Type::UUID,
            Type::UUID,
            Type::UUID,
            Type::UUID,
            Type::VARCHAR,
            Type::TIMESTAMPTZ,
        ];
        let w = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(w);
        let mut rng = crate::workload::Rng::new(0x5eed);
        for (ci, c) in t.campaigns.iter().enumerate() {
            let ids = &contact_ids[c.org];
            let k = t.campaigns[..ci].iter().filter(|x| x.org == c.org).count();
            let reach = CAMPAIGN_REACH[c.org][k];
            let n = ((ids.len() as f64 * reach).round() as usize).clamp(1, ids.len());
            let offset = (k * ids.len() / 4) % ids.len();
            for j in 0..n {
                let contact = (offset + j) % ids.len();
                let id = Uuid::now_v7();
                let sent_at: DateTime<Utc> =
                    now - Duration::seconds(3600 + (rng.next_u64() % 14_400) as i64);
                let row: [&(dyn ToSql + Sync); 6] = [
                    &id,
                    &t.orgs[c.org].id,
                    &c.id,
                    &ids[contact],
                    &"sent",
                    &sent_at,
                ];
                w.as_mut().write(&row).await?;
                t.messages.push(Message {
                    id,
                    org: c.org as u8,
                    campaign: ci as u16,
                    contact: contact as u32,
                });
            }
        }
        w.finish().await?;
    }
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS loadtest; \
         DROP TABLE IF EXISTS loadtest.messages_orig; \
         CREATE TABLE loadtest.messages_orig AS TABLE public.campaign_messages;",
    )
    .await?;
    tx.commit().await?;
    client.batch_execute("VACUUM ANALYZE").await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(t)
}

/// Back to the seeded shape: no events or dead letters, every message as seeded, every
/// contact active; vacuumed, analyzed and checkpointed.
pub async fn reset(url: &str) -> anyhow::Result<()> {
    let client = reachly_ingest::db::connect(url).await?;
    client
        .batch_execute(
            "BEGIN; \
             TRUNCATE public.email_events, public.webhook_dead_letters; \
             TRUNCATE public.campaign_messages CASCADE; \
             INSERT INTO public.campaign_messages SELECT * FROM loadtest.messages_orig; \
             UPDATE public.contacts SET status = 'active' WHERE status IS DISTINCT FROM 'active'; \
             COMMIT;",
        )
        .await?;
    // Every phase starts on the same contacts pages: compacted, as right after the seed.
    // (Without it the first phase met the seed's full pages, where a suppression's new row
    // version lands on another page, and later phases met the free space the reset's UPDATE
    // left, where it stays on the same page: 2.4 against 7.2 contacts pages per 1,000 events.)
    client.batch_execute("VACUUM FULL public.contacts").await?;
    client
        .batch_execute(
            "VACUUM ANALYZE public.campaign_messages, public.contacts, public.email_events",
        )
        .await?;
    client.batch_execute("CHECKPOINT").await?;
    // Statement statistics per phase (when pg_stat_statements is there).
    let _ = client
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await;
    Ok(())
}

/// Drops the day partitions of `email_events` (rows and all), so the next build to start
/// makes its own at start-up: how a partition is created (its storage parameters) is the
/// build's choice, so a build compared with another must not inherit the other's partitions.
pub async fn drop_day_partitions(url: &str) -> anyhow::Result<()> {
    let client = reachly_ingest::db::connect(url).await?;
    let names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'public.email_events'::regclass AND c.relname LIKE 'email\\_events\\_p%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for name in names {
        client
            .batch_execute(&format!("DROP TABLE public.{name}"))
            .await
            .with_context(|| format!("dropping {name}"))?;
    }
    client.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Makes the day partitions this build makes (today's and a week ahead), as the service
/// does at start-up.
pub async fn make_day_partitions(url: &str) -> anyhow::Result<()> {
    let mut c = reachly_ingest::db::connect(url).await?;
    reachly_ingest::db::partitions::maintain(&mut c, chrono::Utc::now().date_naive(), 7, 400)
        .await?;
    Ok(())
}
