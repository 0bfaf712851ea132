//! What an SMS carries and what its history says: the text as the template reads without
//! the file's trailing newline, and the segment count the carrier bills, stored with the
//! run's history on both backends.

mod common;

use std::sync::Arc;

use canvas_engine::policy::Policy;
use canvas_engine::registry::{ChannelSpec, Registry};
use canvas_engine::runtime::{FlowSet, Runtime};
use canvas_engine::scenario;
use canvas_engine::state::{Event, InboxItem, ProfileUpdate, Time};
use canvas_engine::store::{Database, Store};
use common::{with_postgres, with_sqlite};

fn registry() -> Registry {
    let mut r = Registry::new();
    for (name, address) in [("sms", "phone"), ("wechat", "wechat_id")] {
        r.add_channel(ChannelSpec {
            name: name.into(),
            address: Some(address.into()),
            description: String::new(),
        });
    }
    r
}

fn at(s: &str) -> Time {
    scenario::parse_time(s).expect("time").to_utc()
}

/// 200 GSM-7 characters (two segments), then the newline every text file ends with.
fn long_text() -> String {
    format!("Hi {{{{ customer.name }}}}, {}\n", "a".repeat(190))
}

/// A flow that texts, then messages on WeChat, from the same kind of file.
fn flow(dir: &std::path::Path) -> canvas_engine::CompiledFlow {
    std::fs::create_dir_all(dir.join("templates/t")).expect("mkdir");
    std::fs::write(dir.join("templates/t/long.sms.txt"), long_text()).expect("write");
    std::fs::write(dir.join("templates/t/short.txt"), "生日快乐\n\n").expect("write");
    std::fs::write(
        dir.join("f.yaml"),
        "flow: texts\nname: T\ntimezone: UTC\ntrigger: { event: go }\nsteps:\n  \
         - { id: long, send: sms, template: t/long, priority: transactional }\n  \
         - { id: short, send: sms, template: t/short, priority: transactional }\n  \
         - { id: chat, send: wechat, template: t/short, priority: transactional }\n",
    )
    .expect("write");
    let v = canvas_engine::validate_paths(&[dir.to_path_buf()], &registry()).expect("validate");
    assert!(v.is_valid(), "{:#?}", v.diagnostics);
    v.flows().next().expect("one flow").clone()
}

async fn play(db: Arc<Database>) -> Runtime<Database> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::new(
        (*db).clone(),
        FlowSet::new([flow(tmp.path())]),
        Policy::default(),
        registry(),
    );
    let mut set = serde_json::Map::new();
    set.insert("phone".into(), serde_json::json!("+8613800000000"));
    set.insert("wechat_id".into(), serde_json::json!("wx1"));
    set.insert("name".into(), serde_json::json!("Mei"));
    rt.store
        .enqueue(&[
            InboxItem::Profile(ProfileUpdate {
                id: None,
                customer_id: "c1".into(),
                set,
                timezone: None,
                at: at("2026-03-02T10:00Z"),
            }),
            InboxItem::Event(Event {
                id: "e1".into(),
                customer_id: "c1".into(),
                name: "go".into(),
                data: serde_json::json!({}),
                occurred_at: at("2026-03-02T10:00Z"),
            }),
        ])
        .await
        .expect("enqueue");
    rt.process_inbox(at("2026-03-02T10:00Z"))
        .await
        .expect("process");
    rt
}

/// Regression: an SMS carried the template file's trailing newline (and so did a WeChat
/// message from a `.txt` file).
async fn sms_text_carries_no_trailing_newline(db: Arc<Database>) {
    let rt = play(db).await;
    let outbox = rt.store.outbox(Some("c1")).await.expect("outbox");
    let texts: Vec<(&str, &str)> = outbox
        .iter()
        .map(|o| {
            (
                o.step.as_str(),
                o.payload["text"].as_str().expect("a text payload"),
            )
        })
        .collect();
    let long = format!("Hi Mei, {}", "a".repeat(190));
    assert_eq!(
        texts,
        vec![
            ("long", long.as_str()),
            ("short", "生日快乐"),
            ("chat", "生日快乐")
        ]
    );
}

/// Regression: the history of an SMS send did not say how many segments it costs.
async fn sms_history_records_segment_count(db: Arc<Database>) {
    let rt = play(db).await;
    let history = rt.store.history(Some("c1")).await.expect("history");
    let sent: Vec<(&str, &serde_json::Value)> = history
        .iter()
        .filter(|h| h.action == "sent")
        .map(|h| (h.step.as_str(), &h.detail))
        .collect();
    assert_eq!(sent.len(), 3, "{history:#?}");
    assert_eq!(sent[0].0, "long");
    assert_eq!(sent[0].1["segments"], 2, "{:?}", sent[0].1);
    assert_eq!(sent[0].1["encoding"], "gsm7");
    assert_eq!(sent[1].0, "short");
    assert_eq!(sent[1].1["segments"], 1);
    assert_eq!(sent[1].1["encoding"], "ucs2");
    // Only SMS is billed by the segment.
    assert_eq!(sent[2].0, "chat");
    assert!(sent[2].1.get("segments").is_none(), "{:?}", sent[2].1);
}

store_tests!(
    sms_text_carries_no_trailing_newline,
    sms_history_records_segment_count
);
