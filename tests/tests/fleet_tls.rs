use rollout_proto::pb;
use rollout_proto::pb::control_service_client::ControlServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[tokio::test]
async fn explore() {
    let d = std::path::Path::new("/tmp/tlsx");
    for (name, url, tls) in [
        (
            "mix",
            "https://127.0.0.1:17443",
            Some(("pki/ca.pem", "mix/operator.pem", "mix/operator.key")),
        ),
        (
            "foreign",
            "https://127.0.0.1:17443",
            Some(("pki2/ca.pem", "pki2/operator.pem", "pki2/operator.key")),
        ),
        ("plain", "http://127.0.0.1:17443", None),
    ] {
        let mut ep = Endpoint::from_shared(url.to_string()).unwrap();
        if let Some((ca, c, k)) = tls {
            let r = |p: &str| std::fs::read(d.join(p)).unwrap();
            ep = ep
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(r(ca)))
                        .identity(Identity::from_pem(r(c), r(k))),
                )
                .unwrap();
        }
        match ep.connect().await {
            Err(e) => {
                println!("{name}: connect err {e:?}");
                continue;
            }
            Ok(ch) => {
                let mut c = ControlServiceClient::new(ch);
                let r = c.list_rollouts(pb::ListRolloutsRequest::default()).await;
                match r {
                    Ok(_) => println!("{name}: ok"),
                    Err(s) => {
                        println!(
                            "{name}: code {:?} msg {:?}\n debug {s:?}",
                            s.code(),
                            s.message()
                        );
                        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&s);
                        while let Some(e) = src {
                            println!("  source: {e} / {e:?}");
                            src = e.source();
                        }
                    }
                }
            }
        }
    }
}
