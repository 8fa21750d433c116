//! OTLP export of the coordinator's tracing spans (feature `otel`): every
//! span of an execution, a step call and a store commit goes to an
//! OpenTelemetry collector over OTLP/HTTP (JSON), through the same reqwest
//! client stack as the step calls (rustls, no second HTTP library).

use std::time::Duration;

use anyhow::{anyhow, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Sends the exporter's requests with reqwest on the main tokio runtime
/// (the batch processor runs on a thread of its own, outside it).
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let (parts, body) = request.into_parts();
        let mut req = self
            .http
            .request(parts.method, parts.uri.to_string())
            .body(body.to_vec())
            .timeout(Duration::from_secs(10));
        for (k, v) in &parts.headers {
            req = req.header(k, v);
        }
        let sent = self.rt.spawn(async move {
            let r = req.send().await?;
            let status = r.status();
            let bytes = r.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        });
        let (status, bytes) = sent.await??;
        Ok(opentelemetry_http::Response::builder()
            .status(status)
            .body(bytes)?)
    }
}

/// The tracer provider exporting to `endpoint` (the collector's base URL,
/// e.g. `http://127.0.0.1:4318`; `/v1/traces` is added), and the layer that
/// feeds it from `tracing`.
pub fn layer<S>(
    endpoint: &str,
) -> Result<(
    SdkTracerProvider,
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    // reqwest is built without a default TLS provider.
    sagatx_server::install_crypto();
    let client = Client {
        http: reqwest::Client::builder()
            .build()
            .map_err(|e| anyhow!("the OTLP client: {e}"))?,
        rt: tokio::runtime::Handle::current(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url)
        .with_http_client(client)
        .build()
        .map_err(|e| anyhow!("--otlp-endpoint {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("sagatx")
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("sagatx");
    Ok((provider, tracing_opentelemetry::layer().with_tracer(tracer)))
}
