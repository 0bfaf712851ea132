//! The catalogue of channels and plugin node kinds that ship with Canvas.
//!
//! `catalogue()` gives a registry with all of them; an embedder can add its own kinds to it
//! (see `examples/`).

use std::sync::Arc;

use canvas_engine::registry::{ChannelSpec, Registry};

pub mod kinds;

/// Built-in channels: name, the profile attribute with the customer's address, description.
pub const CHANNELS: &[(&str, Option<&str>, &str)] = &[
    ("sms", Some("phone"), "text message to customer.phone"),
    (
        "email",
        Some("email"),
        "email to customer.email, with a plain-text and an HTML part",
    ),
    (
        "wechat",
        Some("wechat_id"),
        "WeChat official-account template message to customer.wechat_id",
    ),
    (
        "wecom",
        Some("wecom_id"),
        "WeCom (enterprise WeChat) message from the customer's associate to customer.wecom_id",
    ),
    (
        "push",
        Some("push_token"),
        "app push notification to customer.push_token",
    ),
    (
        "webhook",
        None,
        "HTTP POST to an internal system, for every customer",
    ),
];

/// A registry with every built-in channel and node kind.
pub fn catalogue() -> Registry {
    let mut registry = Registry::new();
    for (name, address, description) in CHANNELS {
        registry.add_channel(ChannelSpec {
            name: (*name).to_owned(),
            address: address.map(str::to_owned),
            description: (*description).to_owned(),
        });
    }
    registry.add_kind(Arc::new(kinds::Sample));
    registry.add_kind(Arc::new(kinds::Cooldown));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_has_channels_and_kinds() {
        let r = catalogue();
        assert_eq!(
            r.channel("sms").and_then(|c| c.address.as_deref()),
            Some("phone")
        );
        assert!(r.channel("webhook").is_some_and(|c| c.address.is_none()));
        assert!(r.kind("sample").is_some());
        assert!(r.kind("cooldown").is_some());
    }
}
