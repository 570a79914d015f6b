//! What Athena and Glue need to query an S3 destination's objects: the `CREATE EXTERNAL
//! TABLE` statement with partition projection over the `dt=`/`hr=` folders (no crawler and
//! no `MSCK REPAIR` needed as hours are added), and the same table as a Glue `TableInput`
//! (`aws glue create-table --table-input file://...`). `edgeship s3 ddl` prints them.
//!
//! The columns are the JSON line's fields (FORMAT.md, "The ndjson format"); `payload` is a
//! string holding the message's JSON (query it with `json_extract_scalar`), read with the
//! OpenX JSON SerDe, which keeps a nested object's text in a string column. No I/O.

use super::{ObjectFormat, S3Config};

/// The folders of the objects' keys as a projection template (`s3://b/p/dt=${dt}/hr=${hr}/`),
/// or why the key template cannot be projected.
fn location_template(config: &S3Config, route: &str) -> Result<String, String> {
    let text = config.key_template.source();
    let folders = match text.rfind('/') {
        Some(at) => &text[..at],
        None => "",
    };
    if !(folders.contains("{dt}") && folders.contains("{hr}")) {
        return Err(
            "partition projection needs {dt} and {hr} in the key template's folders".into(),
        );
    }
    let mut out = String::new();
    let mut rest = folders;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}').expect("checked at parse");
        match &rest[open + 1..close] {
            "prefix" => out.push_str(&config.prefix),
            "route" => out.push_str(route),
            "dt" => out.push_str("${dt}"),
            "hr" => out.push_str("${hr}"),
            other => {
                return Err(format!(
                    "partition projection cannot follow {{{other}}} in the key template's folders (use {{prefix}}, {{route}}, {{dt}}, {{hr}})"
                ))
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    let folders: Vec<&str> = out.split('/').filter(|s| !s.is_empty()).collect();
    Ok(format!("s3://{}/{}/", config.bucket, folders.join("/")))
}

/// The fixed folder the table's location is: the template's folders up to the first field
/// other than `{prefix}` and `{route}`.
fn location(template: &str) -> String {
    match template.find("${") {
        Some(at) => {
            template[..at]
                .rsplit_once('/')
                .map_or(template, |(a, _)| a)
                .to_string()
                + "/"
        }
        None => template.to_string(),
    }
}

const COLUMNS: &[(&str, &str, &str)] = &[
    (
        "id",
        "string",
        "<gateway>:<seq>, unique per record: deduplicate by it",
    ),
    ("gateway", "string", "the gateway that received the message"),
    ("topic", "string", "the MQTT topic"),
    (
        "ts_ms",
        "bigint",
        "receive time, ms since the Unix epoch (UTC)",
    ),
    (
        "payload",
        "string",
        "the message when it is JSON (its text)",
    ),
    (
        "payload_base64",
        "string",
        "the message when it is not JSON",
    ),
];

/// The projection's table properties.
fn projection(template: &str) -> Vec<(&'static str, String)> {
    vec![
        ("projection.enabled", "true".into()),
        ("projection.dt.type", "date".into()),
        ("projection.dt.format", "yyyy-MM-dd".into()),
        ("projection.dt.range", "2020-01-01,NOW".into()),
        ("projection.dt.interval", "1".into()),
        ("projection.dt.interval.unit", "DAYS".into()),
        ("projection.hr.type", "integer".into()),
        ("projection.hr.range", "0,23".into()),
        ("projection.hr.digits", "2".into()),
        ("storage.location.template", template.into()),
    ]
}

/// Athena's `CREATE EXTERNAL TABLE` for `route`'s objects in this destination.
pub fn create_table(config: &S3Config, route: &str, table: &str) -> Result<String, String> {
    let template = location_template(config, route)?;
    let mut sql = format!("CREATE EXTERNAL TABLE IF NOT EXISTS {table} (\n");
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|(n, t, c)| format!("  `{n}` {t} COMMENT '{c}'"))
        .collect();
    sql.push_str(&columns.join(",\n"));
    sql.push_str("\n)\nPARTITIONED BY (`dt` string, `hr` string)\n");
    sql.push_str(match config.format {
        ObjectFormat::Ndjson => "ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'\n",
        ObjectFormat::Parquet => "STORED AS PARQUET\n",
    });
    sql.push_str(&format!(
        "LOCATION '{}'\nTBLPROPERTIES (\n",
        location(&template)
    ));
    let props: Vec<String> = projection(&template)
        .iter()
        .map(|(k, v)| format!("  '{k}' = '{v}'"))
        .collect();
    sql.push_str(&props.join(",\n"));
    sql.push_str("\n);\n");
    Ok(sql)
}

/// The same table as a Glue `TableInput` (JSON).
pub fn glue_table_input(config: &S3Config, route: &str, table: &str) -> Result<String, String> {
    let template = location_template(config, route)?;
    let mut parameters: serde_json::Map<String, serde_json::Value> = projection(&template)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let storage = match config.format {
        ObjectFormat::Ndjson => (
            "org.apache.hadoop.mapred.TextInputFormat",
            "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat",
            "org.openx.data.jsonserde.JsonSerDe",
        ),
        ObjectFormat::Parquet => (
            "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe",
        ),
    };
    let classification = match config.format {
        ObjectFormat::Ndjson => "json",
        ObjectFormat::Parquet => "parquet",
    };
    parameters.insert("classification".into(), classification.into());
    parameters.insert("EXTERNAL".into(), "TRUE".into());
    let input = serde_json::json!({
        "Name": table,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": parameters,
        "PartitionKeys": [{"Name": "dt", "Type": "string"}, {"Name": "hr", "Type": "string"}],
        "StorageDescriptor": {
            "Columns": COLUMNS.iter().map(|(n, t, c)| serde_json::json!({"Name": n, "Type": t, "Comment": c})).collect::<Vec<_>>(),
            "Location": location(&template),
            "InputFormat": storage.0,
            "OutputFormat": storage.1,
            "SerdeInfo": {"SerializationLibrary": storage.2},
        },
    });
    Ok(serde_json::to_string_pretty(&input).expect("JSON values"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::s3::layout::{KeyTemplate, DEFAULT_TEMPLATE};

    fn config(template: &str) -> S3Config {
        S3Config {
            bucket: "lake".into(),
            prefix: "telemetry".into(),
            region: None,
            endpoint: None,
            path_style: false,
            key_template: KeyTemplate::parse(template).unwrap(),
            format: ObjectFormat::Ndjson,
            compression: super::super::Compression::Zstd,
            compression_level: 3,
            max_object_bytes: 64 << 20,
            max_object_age: std::time::Duration::from_secs(900),
            part_bytes: 5 << 20,
            upload_windows: Vec::new(),
            sse_kms_key_id: None,
        }
    }

    #[test]
    fn the_default_layout_projects_dt_and_hr_under_the_prefix() {
        let sql = create_table(&config(DEFAULT_TEMPLATE), "r", "telemetry").unwrap();
        assert!(sql.contains("LOCATION 's3://lake/telemetry/'"), "{sql}");
        assert!(
            sql.contains("'storage.location.template' = 's3://lake/telemetry/dt=${dt}/hr=${hr}/'"),
            "{sql}"
        );
        assert!(sql.contains("PARTITIONED BY (`dt` string, `hr` string)"));
        let glue: serde_json::Value =
            serde_json::from_str(&glue_table_input(&config(DEFAULT_TEMPLATE), "r", "t").unwrap())
                .unwrap();
        assert_eq!(
            glue["StorageDescriptor"]["Location"],
            "s3://lake/telemetry/"
        );
        assert_eq!(glue["Parameters"]["projection.hr.digits"], "2");
        assert_eq!(glue["StorageDescriptor"]["Columns"][3]["Type"], "bigint");
    }

    #[test]
    fn a_layout_by_route_projects_and_one_by_gateway_folder_is_refused() {
        let c = config("{prefix}/{route}/{dt}-{hr}/{first_seq}");
        let sql = create_table(&c, "plant7", "t").unwrap();
        assert!(
            sql.contains("'s3://lake/telemetry/plant7/${dt}-${hr}/'")
                && sql.contains("LOCATION 's3://lake/telemetry/plant7/'"),
            "{sql}"
        );
        let e = create_table(
            &config("{prefix}/{gateway}/dt={dt}/hr={hr}/{first_seq}"),
            "r",
            "t",
        )
        .unwrap_err();
        assert!(e.contains("{gateway}"), "{e}");
        let e = create_table(&config("{prefix}/{first_seq}"), "r", "t").unwrap_err();
        assert!(e.contains("{dt} and {hr}"), "{e}");
    }
}
