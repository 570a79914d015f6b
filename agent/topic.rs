//! MQTT topic filters and the templates rendered from a message's topic (partition keys,
//! explicit hash keys): their syntax, checked once at config load, and their use per message.
//!
//! Pure functions over strings: filter matching (`+`, `#`) and templates (`{gateway}`,
//! `{route}`, `{topic}`, `{topic[N]}`). No I/O, no allocation beyond the key string a
//! template renders. Which route a topic belongs to is the router's business
//! (`source::router`).

use std::fmt;

/// A topic filter or template that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TopicError {
    #[error("a topic filter must not be empty")]
    EmptyFilter,
    #[error("`{0}`: `#` must be a whole level and the last one")]
    MultiLevel(String),
    #[error("`{0}`: `+` must be a whole level")]
    SingleLevel(String),
    #[error("`{0}`: `{{` without a closing `}}`")]
    Unclosed(String),
    #[error("`{template}`: unknown placeholder `{{{name}}}`; use {{gateway}}, {{route}}, {{topic}} or {{topic[N]}}")]
    Placeholder { template: String, name: String },
    #[error("`{0}`: `}}` without an opening `{{`")]
    Unopened(String),
    #[error("a partition key template must not be empty")]
    EmptyTemplate,
}

/// An MQTT topic filter, checked once at config load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicFilter(String);

impl TopicFilter {
    pub(crate) fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        if filter.is_empty() {
            return Err(TopicError::EmptyFilter);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(TopicError::MultiLevel(filter.to_string()));
            }
            if level.contains('+') && *level != "+" {
                return Err(TopicError::SingleLevel(filter.to_string()));
            }
        }
        Ok(TopicFilter(filter.to_string()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// MQTT matching; topics starting with `$` match no leading wildcard.
    pub(crate) fn matches(&self, topic: &str) -> bool {
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
pub(crate) struct KeyTemplate {
    parts: Vec<Part>,
}

impl KeyTemplate {
    pub(crate) fn parse(template: &str) -> Result<KeyTemplate, TopicError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| TopicError::Unclosed(template.to_string()))?
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
                        .ok_or_else(|| TopicError::Placeholder {
                            template: template.to_string(),
                            name: name.to_string(),
                        })?;
                    Part::TopicLevel(index)
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(TopicError::Unopened(template.to_string()));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err(TopicError::EmptyTemplate);
        }
        Ok(KeyTemplate { parts })
    }

    /// The key for one message. A missing topic level renders as empty; a key that would be
    /// empty becomes the gateway id, and keys are cut to `max_chars` characters.
    pub(crate) fn render(
        &self,
        gateway: &str,
        route: &str,
        topic: &str,
        max_chars: usize,
    ) -> String {
        let mut key = String::with_capacity(topic.len());
        // A topic is the broker's to check, and a NUL in it (MQTT forbids it, not every
        // broker refuses it) would end the key where the spool's key format puts its
        // separator: left out. (Every message's key is rendered: a topic without one, the
        // rule, is copied whole rather than a character at a time.)
        let push_topic = |key: &mut String, text: &str| {
            if text.contains('\0') {
                key.extend(text.chars().filter(|c| *c != '\0'));
            } else {
                key.push_str(text);
            }
        };
        for part in &self.parts {
            match part {
                Part::Text(t) => key.push_str(t),
                Part::Gateway => key.push_str(gateway),
                Part::Route => key.push_str(route),
                Part::Topic => push_topic(&mut key, topic),
                Part::TopicLevel(n) => push_topic(&mut key, topic.split('/').nth(*n).unwrap_or("")),
            }
        }
        if key.is_empty() {
            key.push_str(gateway);
        }
        // A key has no more characters than bytes: only one longer in bytes is counted.
        if key.len() > max_chars && key.chars().count() > max_chars {
            key = key.chars().take(max_chars).collect();
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
        assert_eq!(
            t.render("gw", "r", "devices/pump-7/telemetry", 256),
            "pump-7"
        );
        assert_eq!(t.render("gw", "r", "devices", 256), "gw");
        let t = KeyTemplate::parse("site/{gateway}/{route}").unwrap();
        assert_eq!(t.render("gw", "r", "x", 256), "site/gw/r");
        assert!(KeyTemplate::parse("{device}").is_err());
        assert!(KeyTemplate::parse("{topic").is_err());
        let long = KeyTemplate::parse("{topic}")
            .unwrap()
            .render("g", "r", &"x".repeat(300), 256);
        assert_eq!(long.len(), 256);
        // The cut is in characters: 200 two-byte ones are 400 bytes and stay whole.
        let template = KeyTemplate::parse("{topic}").unwrap();
        let wide = template.render("g", "r", &"é".repeat(200), 256);
        assert_eq!(wide, "é".repeat(200));
        let cut = template.render("g", "r", &"é".repeat(300), 256);
        assert_eq!(cut, "é".repeat(256));
        // Found by fuzzing: a NUL in the topic ended the partition key early.
        let t = KeyTemplate::parse("{route}-{topic}").unwrap();
        assert_eq!(
            t.render("gw", "r", "devicp\u{11}\u{1}\0es/p", 256),
            "r-devicp\u{11}\u{1}es/p"
        );
    }
}
