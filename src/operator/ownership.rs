//! Whose an object is. The operator changes or deletes only what it made for
//! a TokenPolicy: an object that is absent, or controlled by that very
//! TokenPolicy (a controller ownerReference with its uid). Anything else
//! under one of its names belongs to someone else: it is reported on the
//! TokenPolicy and never touched.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::Api;
use serde::de::DeserializeOwned;

use crate::crd::TokenPolicy;

/// An object under one of the operator's names, as the API server has it.
#[derive(Debug, Clone, PartialEq)]
pub enum Found<K> {
    Absent,
    /// Controlled by this TokenPolicy.
    Ours(K),
    /// Someone else's: the kind and name, for the condition's message.
    Foreign(String),
}

impl<K> Found<K> {
    pub fn is_foreign(&self) -> bool {
        self.foreign().is_some()
    }

    /// The kind and name of someone else's object.
    pub fn foreign(&self) -> Option<&str> {
        match self {
            Found::Foreign(what) => Some(what),
            _ => None,
        }
    }
}

/// Whether `meta`'s controller is `tp` (same uid; a name is not enough, as
/// a TokenPolicy deleted and made again under its name is another one).
pub fn controlled_by(meta: &ObjectMeta, tp: &TokenPolicy) -> bool {
    let Some(uid) = tp.meta().uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Classifies an object read from the API server (`None`: not found).
pub fn classify<K>(obj: Option<K>, tp: &TokenPolicy) -> Found<K>
where
    K: Resource<DynamicType = ()>,
{
    match obj {
        None => Found::Absent,
        Some(o) if controlled_by(o.meta(), tp) => Found::Ours(o),
        Some(o) => Found::Foreign(format!(
            "{} {}",
            K::kind(&()),
            o.meta().name.as_deref().unwrap_or_default()
        )),
    }
}

/// Reads `name` and says whose it is.
pub async fn find<K>(api: &Api<K>, name: &str, tp: &TokenPolicy) -> Result<Found<K>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    Ok(classify(api.get_opt(name).await?, tp))
}

/// The condition message for the objects in the way.
pub fn conflict_message(foreign: &[String]) -> String {
    format!(
        "{} already {} and {} not controlled by this TokenPolicy: left unchanged. \
         Rename or remove {}, or give the TokenPolicy another name",
        foreign.join(", "),
        if foreign.len() == 1 {
            "exists"
        } else {
            "exist"
        },
        if foreign.len() == 1 { "is" } else { "are" },
        if foreign.len() == 1 { "it" } else { "them" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn policy(uid: &str) -> TokenPolicy {
        let mut tp = TokenPolicy::new("demo", Default::default());
        tp.metadata.uid = Some(uid.into());
        tp
    }

    fn service(owners: Vec<OwnerReference>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("tokenpolicy-demo".into()),
                owner_references: Some(owners),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn owner(uid: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "auth.tokenpolicy.io/v1alpha1".into(),
            kind: "TokenPolicy".into(),
            name: "demo".into(),
            uid: uid.into(),
            controller,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_controller_reference_with_our_uid_makes_it_ours() {
        let tp = policy("uid-1");
        let ours = service(vec![owner("other", None), owner("uid-1", Some(true))]);
        assert_eq!(classify(Some(ours.clone()), &tp), Found::Ours(ours));
        assert_eq!(classify(None::<Service>, &tp), Found::Absent);
        for owners in [
            vec![],
            // Same name, another TokenPolicy (deleted and made again).
            vec![owner("uid-0", Some(true))],
            // Ours, but not as controller.
            vec![owner("uid-1", None)],
            vec![owner("uid-1", Some(false))],
        ] {
            let found = classify(Some(service(owners.clone())), &tp);
            assert_eq!(
                found,
                Found::Foreign("Service tokenpolicy-demo".into()),
                "{owners:?}"
            );
            assert!(found.is_foreign());
        }
        // A TokenPolicy without a uid (never stored) owns nothing.
        let mut unsaved = tp.clone();
        unsaved.metadata.uid = None;
        let ours = service(vec![owner("", Some(true))]);
        assert!(classify(Some(ours), &unsaved).is_foreign());
    }

    #[test]
    fn the_message_names_every_object_in_the_way() {
        assert_eq!(
            conflict_message(&["Service tokenpolicy-demo".into()]),
            "Service tokenpolicy-demo already exists and is not controlled by this \
             TokenPolicy: left unchanged. Rename or remove it, or give the TokenPolicy \
             another name"
        );
        let two = conflict_message(&["Role a".into(), "Secret b".into()]);
        assert!(
            two.starts_with("Role a, Secret b already exist and are not"),
            "{two}"
        );
    }
}
