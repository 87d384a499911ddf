#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().init();
    let _: figment::Figment = figment::Figment::new().merge(figment::providers::Env::prefixed("X_"));
    let config = aws_config::load_from_env().await;
    let s3 = aws_sdk_s3::Client::new(&config);
    let kv = aws_sdk_kinesisvideo::Client::new(&config);
    let am = aws_sdk_kinesisvideoarchivedmedia::Client::new(&config);
    let _ = s3.create_multipart_upload().bucket("b").key("k").send().await;
    let _ = s3.upload_part().bucket("b").key("k").send().await;
    let _ = s3.complete_multipart_upload().bucket("b").key("k").send().await;
    let _ = s3.list_objects_v2().bucket("b").send().await;
    let _ = kv.get_data_endpoint().send().await;
    let _ = kv.describe_stream().send().await;
    let _ = am.get_clip().send().await;
    let _ = am.list_fragments().send().await;
    let _ = sqlx::sqlite::SqlitePool::connect("sqlite::memory:").await;
    let _ = sqlx::postgres::PgPool::connect_lazy("postgres://x@127.0.0.1/x");
    let zone: chrono_tz::Tz = "Europe/Berlin".parse().unwrap_or(chrono_tz::UTC);
    let now = chrono::Utc::now().with_timezone(&zone);
    let parser = croner::parser::CronParser::builder().seconds(croner::parser::Seconds::Required).build();
    let _ = parser.parse("0 0 * * * *").map(|cron| cron.find_next_occurrence(&now, false));
    let _ = Error::Cron;
    tracing::info!("done");
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cron")]
    Cron,
}
