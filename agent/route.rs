//! Routing: which route a topic belongs to, and the partition key a record gets.
//!
//! Pure functions over strings: MQTT topic-filter matching (`+`, `#`) and partition-key
//! templates (`{gateway}`, `{route}`, `{topic}`, `{topic[N]}`). The first route whose filter
//! matches wins. No I/O, no allocation beyond the key string it returns.

use std::fmt;

/// An MQTT topic filter, checked once at config load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("a topic filter must not be empty".into());
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(format!(
                    "`{filter}`: `#` must be a whole level and the last one"
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!("`{filter}`: `+` must be a whole level"));
            }
        }
        Ok(TopicFilter(filter.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// MQTT matching; topics starting with `$` match no leading wildcard.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut filter = self.0.split('/');
        let mut levels = topic.split('/');
        loop {
            match (filter.next(), levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Gateway,
    Route,
    Topic,
    TopicLevel(usize),
}

/// A partition-key template such as `"{topic[1]}"` or `"site-a/{gateway}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

/// Kinesis partition keys are 1 to 256 Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

impl KeyTemplate {
    pub fn parse(template: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{template}`: `{{` without a closing `}}`"))?
                + open;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "gateway" => Part::Gateway,
                "route" => Part::Route,
                "topic" => Part::Topic,
                _ => {
                    let index = name
                        .strip_prefix("topic[")
                        .and_then(|s| s.strip_suffix(']'))
                        .and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| {
                            format!("`{template}`: unknown placeholder `{{{name}}}`; use {{gateway}}, {{route}}, {{topic}} or {{topic[N]}}")
                        })?;
                    Part::TopicLevel(index)
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{template}`: `}}` without an opening `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("a partition key template must not be empty".into());
        }
        Ok(KeyTemplate { parts })
    }

    /// The key for one message. A missing topic level renders as empty; a key that would be
    /// empty becomes the gateway id, and keys are cut to Kinesis' 256 characters.
    pub fn render(&self, gateway: &str, route: &str, topic: &str) -> String {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => key.push_str(t),
                Part::Gateway => key.push_str(gateway),
                Part::Route => key.push_str(route),
                Part::Topic => key.push_str(topic),
                Part::TopicLevel(n) => key.push_str(topic.split('/').nth(*n).unwrap_or("")),
            }
        }
        if key.is_empty() {
            key.push_str(gateway);
        }
        if key.chars().count() > MAX_PARTITION_KEY_CHARS {
            key = key.chars().take(MAX_PARTITION_KEY_CHARS).collect();
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(f("a/+/c").matches("a/b/c"));
        assert!(!f("a/+/c").matches("a/b/d"));
        assert!(!f("a/+/c").matches("a/b/c/d"));
        assert!(f("a/#").matches("a/b/c"));
        assert!(f("a/#").matches("a"));
        assert!(f("#").matches("x/y"));
        assert!(!f("#").matches("$SYS/broker"));
        assert!(f("+/+").matches("/x"));
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
    }

    #[test]
    fn templates_render_topic_levels() {
        let t = KeyTemplate::parse("{topic[1]}").unwrap();
        assert_eq!(t.render("gw", "r", "devices/pump-7/telemetry"), "pump-7");
        assert_eq!(t.render("gw", "r", "devices"), "gw");
        let t = KeyTemplate::parse("site/{gateway}/{route}").unwrap();
        assert_eq!(t.render("gw", "r", "x"), "site/gw/r");
        assert!(KeyTemplate::parse("{device}").is_err());
        assert!(KeyTemplate::parse("{topic").is_err());
        let long = KeyTemplate::parse("{topic}")
            .unwrap()
            .render("g", "r", &"x".repeat(300));
        assert_eq!(long.len(), 256);
    }
}
