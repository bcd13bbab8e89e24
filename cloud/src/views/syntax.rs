//! A view's definition as its config writes it (`fn = "count"`,
//! `of = "tags.user"`, `size = "1m"`), for `GET /v1/views` and `kappa-cloud
//! views list --json`. The store keeps the parsed spec's own shape (its
//! fingerprint), which names Rust types (`{"Tag": "user"}`); an operator
//! reads the config's language.

use std::time::Duration;

use serde_json::{Value, json};

use super::spec::{AGG_FNS, AggFn, Field, Literal, OPS, OutputMode, ViewSpec, WindowSpec};

/// `spec` as its `[[views]]` table would write it, as JSON.
pub fn config_syntax(spec: &ViewSpec) -> Value {
    let aggregates: Vec<Value> = spec
        .aggregates
        .iter()
        .map(|a| {
            let mut agg = json!({ "name": a.name, "fn": agg_name(a.func) });
            if let Some(of) = &a.of {
                agg["of"] = json!(field_name(of));
            }
            if matches!(a.func, AggFn::Set | AggFn::List) {
                agg["max"] = json!(a.max);
            }
            agg
        })
        .collect();
    let filter: Vec<String> = spec
        .filter
        .iter()
        .map(|c| {
            let op = OPS.iter().find(|(_, o)| *o == c.op).map_or("?", |(tok, _)| tok);
            let value = match &c.value {
                Literal::Num(n) => n.to_string(),
                Literal::Str(s) => s.clone(),
            };
            format!("{} {op} {value}", field_name(&c.field))
        })
        .collect();
    json!({
        "name": spec.name,
        "version": spec.version,
        "key": field_name(&spec.key),
        "window": window(spec.window),
        "output": match spec.output { OutputMode::Update => "update", OutputMode::Final => "final" },
        "allowed_lateness": duration(spec.allowed_lateness_ms),
        "filter": filter,
        "aggregates": aggregates,
    })
}

/// A stored definition (the spec's fingerprint) in the config's language;
/// a definition this version cannot read is passed through as stored.
pub fn stored_in_config_syntax(stored: &Value) -> Value {
    match serde_json::from_value::<ViewSpec>(stored.clone()) {
        Ok(spec) => config_syntax(&spec),
        Err(_) => stored.clone(),
    }
}

fn field_name(f: &Field) -> String {
    match f {
        Field::Device => "device".into(),
        Field::EventTime => "event_time".into(),
        Field::Metric(m) => m.clone(),
        Field::Tag(t) => format!("tags.{t}"),
    }
}

fn agg_name(f: AggFn) -> &'static str {
    AGG_FNS.iter().find(|(_, g)| *g == f).map_or("?", |(name, _)| name)
}

fn window(w: WindowSpec) -> Value {
    match w {
        WindowSpec::Tumbling { size_ms } => json!({ "kind": "tumbling", "size": duration(size_ms) }),
        WindowSpec::Hopping { size_ms, slide_ms } => {
            json!({ "kind": "hopping", "size": duration(size_ms), "slide": duration(slide_ms) })
        }
        WindowSpec::Session { gap_ms } => json!({ "kind": "session", "gap": duration(gap_ms) }),
        WindowSpec::Global => json!({ "kind": "global" }),
    }
}

/// Milliseconds as a config writes a duration (`"1m"`, `"1h 30m"`, `"0s"`).
fn duration(ms: i64) -> String {
    if ms <= 0 {
        return "0s".into();
    }
    humantime::format_duration(Duration::from_millis(ms.unsigned_abs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_back_as_its_config_wrote_it() {
        let text = r#"
            [[views]]
            name = "sessions"
            version = 2
            key = "tags.user"
            window = { kind = "session", gap = "30m" }
            output = "final"
            allowed_lateness = "1h 30m"
            filter = ["temperature > 30.5", "tags.type == alarm"]
            aggregates = [
              { name = "n", fn = "count" },
              { name = "hot", fn = "max", of = "temperature" },
              { name = "devices", fn = "set", of = "device", max = 50 },
            ]
        "#;
        let doc: toml::Table = toml::from_str(text).unwrap();
        let tables: Vec<toml::Table> =
            doc["views"].as_array().unwrap().iter().map(|v| v.as_table().unwrap().clone()).collect();
        let metrics = vec!["temperature".to_string()];
        let spec = super::super::spec::parse_views(&tables, &metrics).unwrap().remove(0);
        let shown = config_syntax(&spec);
        assert_eq!(shown["key"], "tags.user");
        assert_eq!(shown["window"], json!({ "kind": "session", "gap": "30m" }));
        assert_eq!((shown["output"].as_str(), shown["allowed_lateness"].as_str()), (Some("final"), Some("1h 30m")));
        assert_eq!(shown["filter"], json!(["temperature > 30.5", "tags.type == alarm"]));
        assert_eq!(
            shown["aggregates"],
            json!([
                { "name": "n", "fn": "count" },
                { "name": "hot", "fn": "max", "of": "temperature" },
                { "name": "devices", "fn": "set", "of": "device", "max": 50 },
            ])
        );
        // What the store keeps reads back the same way.
        let stored: Value = serde_json::from_str(&spec.fingerprint()).unwrap();
        assert_eq!(stored_in_config_syntax(&stored), shown);
        assert!(!shown.to_string().contains("Tag") && !shown.to_string().contains("Count"), "{shown}");
    }
}
