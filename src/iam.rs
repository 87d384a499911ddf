//! The least-privilege IAM policy for a configuration: exactly the actions the program
//! calls, on the configured streams and the destination's bucket and prefix.
//!
//! Which API call needs which IAM action (AWS's service authorization reference):
//! - KVS: DescribeStream, GetDataEndpoint, ListFragments, GetClip and
//!   GetMediaForFragmentList (fragments GetClip cannot package, archived as Matroska),
//!   each its own action of the same name, on the stream's ARN.
//! - S3: CreateMultipartUpload, UploadPart, CompleteMultipartUpload and PutObject all
//!   need `s3:PutObject`; AbortMultipartUpload `s3:AbortMultipartUpload`, and ListParts
//!   (that an aborted upload is gone) `s3:ListMultipartUploadParts`; GetObject and
//!   HeadObject (`verify`, `export`, `rebuild-ledger`, `find` and `serve` read objects
//!   back) `s3:GetObject`; ListObjectsV2 (`verify`, `rebuild-ledger`, and the start-up
//!   check of the bucket) `s3:ListBucket`, limited to the prefix;
//!   ListMultipartUploads (finding the program's own unfinished uploads after a crash)
//!   `s3:ListBucketMultipartUploads`, which takes no prefix condition.
//!
//! - What the object settings add: Object Lock headers on a write need
//!   `s3:PutObjectRetention` (and `s3:PutObjectLegalHold` for a hold), with
//!   `s3:GetBucketObjectLockConfiguration` for the start-up check; tags on a write
//!   `s3:PutObjectTagging`; SSE-KMS `kms:GenerateDataKey` (writes) and `kms:Decrypt`
//!   (multipart uploads and reads) on the key; `destination.role_arn` `sts:AssumeRole`
//!   for the credentials the program starts with (the S3 statements then belong to the
//!   role).
//!
//! tests/archiver/iam.rs checks this list against the requests the program really sends.

use crate::config::Config;
use serde_json::{json, Value};

/// The KVS actions, in the order a pass first calls them.
pub const KVS_ACTIONS: [&str; 5] = [
    "kinesisvideo:DescribeStream",
    "kinesisvideo:GetDataEndpoint",
    "kinesisvideo:ListFragments",
    "kinesisvideo:GetClip",
    "kinesisvideo:GetMediaForFragmentList",
];

/// The AWS partition of a region: its ARNs start `arn:<partition>:`.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The policy document for `config`. `account`: the streams' AWS account id, where
/// streams are named rather than given by ARN (`*` otherwise).
pub fn policy(config: &Config, account: Option<&str>) -> Value {
    let region = &config.aws.region;
    let partition = partition(region);
    let account = account.unwrap_or("*");
    // A stream's ARN ends in its creation time, which a name does not tell.
    let streams: Vec<String> = config
        .streams
        .iter()
        .map(|s| match &s.arn {
            Some(arn) => arn.clone(),
            None => format!(
                "arn:{partition}:kinesisvideo:{region}:{account}:stream/{}/*",
                s.label()
            ),
        })
        .collect();
    let mut statements = vec![json!({
        "Sid": "ReadKinesisVideoStreams",
        "Effect": "Allow",
        "Action": KVS_ACTIONS,
        "Resource": streams,
    })];
    if let Some(bucket) = &config.destination.bucket {
        let prefix = &config.destination.prefix;
        statements.push(json!({
            "Sid": "WriteAndReadArchivedObjects",
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts", "s3:GetObject"],
            "Resource": format!("arn:{partition}:s3:::{bucket}/{prefix}*"),
        }));
        let mut list = json!({
            "Sid": "ListArchivedObjects",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": format!("arn:{partition}:s3:::{bucket}"),
        });
        if !prefix.is_empty() {
            list["Condition"] = json!({ "StringLike": { "s3:prefix": [format!("{prefix}*")] } });
        }
        statements.push(list);
        statements.push(json!({
            "Sid": "FindUnfinishedUploads",
            "Effect": "Allow",
            "Action": ["s3:ListBucketMultipartUploads"],
            "Resource": format!("arn:{partition}:s3:::{bucket}"),
        }));
        statements.extend(settings_statements(config, partition, account));
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// What storage class, tags, Object Lock, KMS and a role add (see the module's doc).
fn settings_statements(config: &Config, partition: &str, account: &str) -> Vec<Value> {
    let d = &config.destination;
    let Some(bucket) = &d.bucket else {
        return Vec::new();
    };
    let prefix = &d.prefix;
    let mut statements = Vec::new();
    let mut object_actions = Vec::new();
    let settings: Vec<_> =
        std::iter::once(config.object_settings(&crate::config::StreamConfig::named("*")))
            .chain(config.streams.iter().map(|s| config.object_settings(s)))
            .collect();
    if settings.iter().any(|s| !s.tags.is_empty()) {
        object_actions.push("s3:PutObjectTagging");
    }
    // `kvs-archiver restore` (objects in an archive class).
    if settings.iter().any(|s| {
        matches!(
            s.storage_class,
            Some(
                crate::storage::StorageClass::Glacier
                    | crate::storage::StorageClass::DeepArchive
                    | crate::storage::StorageClass::IntelligentTiering
            )
        )
    }) {
        object_actions.push("s3:RestoreObject");
    }
    if config.uses_object_lock() {
        object_actions.push("s3:PutObjectRetention");
        statements.push(json!({
            "Sid": "CheckObjectLock",
            "Effect": "Allow",
            "Action": ["s3:GetBucketObjectLockConfiguration"],
            "Resource": format!("arn:{partition}:s3:::{bucket}"),
        }));
    }
    if settings
        .iter()
        .any(|s| s.object_lock.as_ref().is_some_and(|l| l.legal_hold))
    {
        object_actions.push("s3:PutObjectLegalHold");
    }
    if !object_actions.is_empty() {
        statements.push(json!({
            "Sid": "SetObjectSettings",
            "Effect": "Allow",
            "Action": object_actions,
            "Resource": format!("arn:{partition}:s3:::{bucket}/{prefix}*"),
        }));
    }
    let region = &config.aws.region;
    // A bucket reached through a role is the role's account's, and so are its keys.
    let role_account = d
        .role_arn
        .as_deref()
        .and_then(|arn| arn.split(':').nth(4))
        .filter(|a| !a.is_empty());
    let account = role_account.unwrap_or(account);
    let keys: Vec<String> = config
        .kms_keys()
        .into_iter()
        .filter_map(|k| k.key_id)
        .map(|key| {
            if key.starts_with("arn:") && !key.contains(":alias/") {
                key
            } else if key.starts_with("alias/") || key.contains(":alias/") {
                // A key named by alias: its ARN is not known here.
                format!("arn:{partition}:kms:{region}:{account}:key/*")
            } else {
                format!("arn:{partition}:kms:{region}:{account}:key/{key}")
            }
        })
        .collect();
    if !keys.is_empty() {
        statements.push(json!({
            "Sid": "EncryptWithKmsKey",
            "Effect": "Allow",
            "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
            "Resource": keys,
        }));
    }
    if let Some(role) = &d.role_arn {
        statements.push(json!({
            "Sid": "AssumeDestinationRole",
            "Effect": "Allow",
            "Action": ["sts:AssumeRole"],
            "Resource": role,
        }));
    }
    statements
}

/// With `destination.role_arn`, the policy in two: what the credentials the program
/// starts with need (KVS, and assuming the role), and what the role needs (S3, KMS).
/// `None` without a role.
pub fn split_for_role(config: &Config, policy: &Value) -> Option<Value> {
    let role = config.destination.role_arn.as_ref()?;
    let statements = policy["Statement"].as_array().cloned().unwrap_or_default();
    let (credentials, assumed): (Vec<Value>, Vec<Value>) = statements.into_iter().partition(|s| {
        matches!(
            s["Sid"].as_str(),
            Some("ReadKinesisVideoStreams" | "AssumeDestinationRole")
        )
    });
    Some(json!({
        "credentials": { "Version": "2012-10-17", "Statement": credentials },
        "role": { "Version": "2012-10-17", "Statement": assumed },
        "role_arn": role,
    }))
}

/// Every action the policy allows.
pub fn actions(policy: &Value) -> Vec<String> {
    policy["Statement"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["Action"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamConfig;

    fn config(prefix: &str) -> Config {
        let mut config = Config::default();
        config.aws.region = "eu-west-1".into();
        config.destination.bucket = Some("footage".into());
        config.destination.prefix = prefix.into();
        config.streams = vec![StreamConfig::named("dock-cam")];
        config
    }

    #[test]
    fn scopes_streams_and_the_prefix() {
        let p = policy(&config("site-a/"), Some("123456789012"));
        assert_eq!(
            p["Statement"][0]["Resource"][0],
            "arn:aws:kinesisvideo:eu-west-1:123456789012:stream/dock-cam/*"
        );
        assert_eq!(
            p["Statement"][1]["Resource"],
            "arn:aws:s3:::footage/site-a/*"
        );
        assert_eq!(
            p["Statement"][2]["Condition"]["StringLike"]["s3:prefix"][0],
            "site-a/*"
        );
        assert_eq!(actions(&p).len(), 11);
    }

    #[test]
    fn no_prefix_no_condition_and_a_directory_needs_no_s3() {
        let p = policy(&config(""), None);
        assert!(p["Statement"][2].get("Condition").is_none());
        let mut dir = config("");
        dir.destination.bucket = None;
        dir.destination.directory = Some("/srv/footage".into());
        let p = policy(&dir, None);
        assert_eq!(actions(&p), KVS_ACTIONS.map(str::to_string).to_vec());
    }

    #[test]
    fn settings_add_exactly_their_actions() {
        let mut c = config("site-a/");
        assert_eq!(actions(&policy(&c, None)).len(), 11);
        c.destination.tags = [("team".to_string(), "{stream}".to_string())].into();
        c.destination.sse = Some(crate::storage::Sse::Kms);
        c.destination.kms_key_id = Some("1234abcd-12ab-34cd-56ef-1234567890ab".into());
        c.destination.object_lock = Some(crate::storage::ObjectLockConfig {
            mode: crate::storage::LockMode::Governance,
            retain_for: std::time::Duration::from_secs(86_400 * 30),
            retain_from: Default::default(),
            legal_hold: true,
        });
        c.destination.role_arn = Some("arn:aws:iam::210987654321:role/archiver".into());
        let p = policy(&c, Some("123456789012"));
        let all = actions(&p);
        for action in [
            "s3:PutObjectTagging",
            "s3:PutObjectRetention",
            "s3:PutObjectLegalHold",
            "s3:GetBucketObjectLockConfiguration",
            "kms:GenerateDataKey",
            "kms:Decrypt",
            "sts:AssumeRole",
        ] {
            assert!(all.iter().any(|a| a == action), "{action}: {all:?}");
        }
        assert_eq!(all.len(), 18, "{all:?}");
        let split = split_for_role(&c, &p).expect("a role");
        let kms = split["role"]["Statement"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["Sid"] == "EncryptWithKmsKey"))
            .expect("kms statement on the role");
        // The key is the role's (the bucket's) account's: 210987654321, not the streams'.
        assert_eq!(
            kms["Resource"][0],
            "arn:aws:kms:eu-west-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        );
        assert_eq!(
            actions(&split["credentials"]),
            [&KVS_ACTIONS[..], &["sts:AssumeRole"]].concat()
        );
    }

    #[test]
    fn china_and_govcloud_partitions() {
        let mut c = config("");
        c.aws.region = "cn-north-1".into();
        let p = policy(&c, None);
        assert!(p["Statement"][1]["Resource"]
            .as_str()
            .is_some_and(|r| r.starts_with("arn:aws-cn:s3:::")));
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
    }
}
