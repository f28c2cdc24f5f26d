//! `tokenpolicy render-deployment` (hidden): the Deployment that the
//! operator applies for a TokenPolicy, printed as JSON, with no cluster.
//! Whatever runs the image the way a Pod does (tests/image) reads the
//! container's arguments, environment, mounts and probes from here, so
//! that they are never written a second time.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::crd::TokenPolicy;
use crate::operator::resources;

#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {
    /// A TokenPolicy manifest (YAML, with its metadata).
    pub policy: PathBuf,
    /// The operator's `--image`.
    #[arg(long, default_value = concat!("tokenpolicy:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The operator's `--token-service-trusted-proxies`.
    #[arg(long, value_delimiter = ',')]
    pub token_service_trusted_proxies: Vec<String>,
}

/// The Deployment for the manifest at `args.policy`, as pretty JSON.
pub fn render(args: &RenderArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.policy)
        .with_context(|| format!("reading {}", args.policy.display()))?;
    let tp: TokenPolicy = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{}: not a TokenPolicy", args.policy.display()))?;
    crate::trusted_proxies::TrustedProxies::parse(&args.token_service_trusted_proxies)
        .map_err(|e| anyhow::anyhow!("--token-service-trusted-proxies: {e}"))?;
    let deployment = resources::deployment(
        &tp,
        &args.image,
        &args.token_service_trusted_proxies,
        "signing",
    );
    Ok(serde_json::to_string_pretty(&deployment)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(policy: PathBuf) -> RenderArgs {
        RenderArgs {
            policy,
            image: "img:1".into(),
            token_service_trusted_proxies: vec![],
        }
    }

    #[test]
    fn renders_the_operators_deployment_for_a_manifest() {
        let dir = std::env::temp_dir().join(format!("tp-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tp.yaml");
        std::fs::write(
            &file,
            "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\n\
             metadata: {name: demo, namespace: team}\n\
             spec:\n  sessionExpirationTime: 1h\n  tokenExpirationTime: 10m\n  \
             expiredTokenRenewLimit: 5m\n  users: {secretRef: {name: u, key: users}}\n",
        )
        .unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&render(&args(file.clone())).unwrap()).unwrap();
        let c = &json["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "img:1");
        let argv: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(&argv[..3], ["serve", "--policy-ref", "team/demo"]);
        assert!(argv.contains(&"/etc/tokenpolicy/users/users"));

        std::fs::write(&file, "kind: [").unwrap();
        let err = render(&args(file)).unwrap_err();
        assert!(format!("{err:#}").contains("not a TokenPolicy"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
