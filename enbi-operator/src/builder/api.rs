//! containerd's gRPC API, the calls the load and release containers make: content (info,
//! labels, read, write), images, leases, snapshots and diff. Every call names the namespace,
//! and the lease when one is held, so that what a load writes stays while it runs and goes
//! with the lease if the load fails (containerd's garbage collection takes what no image
//! references).
//!
//! **Why the API and not `ctr`.** One `ctr` call costs about 28 ms on containerd 2.x, and
//! `ctr images import` writes every layer, then unpacks them one after the other. Through the
//! API a load is a few calls of about a millisecond, each layer is unpacked while the next one
//! streams in, and what the node has already is not written again. The calls used here exist
//! unchanged in containerd 1.7 and 2.x.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Kind, ListSnapshotsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteImageRequest, DeleteRequest,
    GetImageRequest, Image, Info, InfoRequest, ListImagesRequest, ReadContentRequest,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::{Descriptor, Mount};
use enbi_core::image_archive;
use futures::SinkExt;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use prost_types::FieldMask;

use super::containerd::ContainerdArgs;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to containerd at {address}: {error}")]
    Connect { address: String, error: String },
    #[error("containerd: {call}: {status}")]
    Call { call: &'static str, status: String },
}

/// A call's error, said briefly (tonic's `Status` prints its metadata too).
fn call_error(call: &'static str) -> impl Fn(Status) -> ApiError {
    move |status| ApiError::Call {
        call,
        status: format!("{:?}: {}", status.code(), status.message()),
    }
}

/// A connection to containerd, bound to a namespace and a snapshotter (and maybe a lease).
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    pub snapshotter: String,
    lease: Option<String>,
}

impl Containerd {
    pub async fn connect(containerd: &ContainerdArgs) -> Result<Self, ApiError> {
        let channel = containerd_client::connect(&containerd.address)
            .await
            .map_err(|e| ApiError::Connect {
                address: containerd.address.display().to_string(),
                error: e.to_string(),
            })?;
        Ok(Self {
            channel,
            namespace: containerd.namespace.clone(),
            snapshotter: containerd.snapshotter.clone(),
            lease: None,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        if let Ok(value) = self.namespace.parse() {
            metadata.insert("containerd-namespace", value);
        }
        if let Some(value) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            metadata.insert("containerd-lease", value);
        }
        request
    }

    /// Takes a lease, expiring after `expiry` should the loader die holding it; calls on the
    /// returned connection are made under it.
    pub async fn with_lease(&self, id: &str, expiry: Duration) -> Result<Self, ApiError> {
        let expire = Timestamp::now()
            .checked_add(SignedDuration::try_from(expiry).unwrap_or(SignedDuration::MAX))
            .unwrap_or(Timestamp::MAX);
        let labels = HashMap::from([("containerd.io/gc.expire".to_owned(), expire.to_string())]);
        LeasesClient::new(self.channel.clone())
            .create(self.request(CreateRequest {
                id: id.to_owned(),
                labels,
            }))
            .await
            .map_err(call_error("create lease"))?;
        Ok(Self {
            lease: Some(id.to_owned()),
            ..self.clone()
        })
    }

    /// A name for something this load makes (a write's reference, an active snapshot's key):
    /// unique as the lease is, so that loads in other containers (whose process IDs may be the
    /// same) never meet.
    pub fn unique(&self, what: &str) -> String {
        format!("{}-{what}", self.lease.as_deref().unwrap_or("enbi"))
    }

    /// Ends the lease: what no image references is collected.
    pub async fn drop_lease(&self) -> Result<(), ApiError> {
        let Some(id) = &self.lease else { return Ok(()) };
        let without = Self {
            lease: None,
            ..self.clone()
        };
        LeasesClient::new(self.channel.clone())
            .delete(without.request(DeleteRequest {
                id: id.clone(),
                sync: false,
            }))
            .await
            .map_err(call_error("delete lease"))?;
        Ok(())
    }

    pub async fn image(&self, name: &str) -> Result<Option<Image>, ApiError> {
        match ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest {
                name: name.to_owned(),
            }))
            .await
        {
            Ok(response) => Ok(response.into_inner().image),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(call_error("get image")(status)),
        }
    }

    /// Every image record of the namespace.
    pub async fn images(&self) -> Result<Vec<Image>, ApiError> {
        Ok(ImagesClient::new(self.channel.clone())
            .list(self.request(ListImagesRequest { filters: vec![] }))
            .await
            .map_err(call_error("list images"))?
            .into_inner()
            .images)
    }

    /// Sets labels on an image (an empty value removes one), nothing else. The record sent
    /// carries the image's target: containerd (1.7, 2.x) fails on an update without one.
    pub async fn label_image(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        let Some(image) = self.image(name).await? else {
            return Ok(());
        };
        let image = Image {
            labels: labels.clone().into_iter().collect(),
            ..image
        };
        self.update_image(image, false).await
    }

    /// Creates the image record; false when the name exists already.
    pub async fn create_image(&self, image: Image) -> Result<bool, ApiError> {
        match ImagesClient::new(self.channel.clone())
            .create(self.request(CreateImageRequest {
                image: Some(image),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::AlreadyExists => Ok(false),
            Err(status) => Err(call_error("create image")(status)),
        }
    }

    /// Sets the image's target (when `target`) and the given labels (an empty value removes
    /// one), in one call.
    pub async fn update_image(&self, image: Image, target: bool) -> Result<(), ApiError> {
        let mut paths: Vec<String> = image.labels.keys().map(|k| format!("labels.{k}")).collect();
        if target {
            paths.push("target".to_owned());
        }
        ImagesClient::new(self.channel.clone())
            .update(self.request(UpdateImageRequest {
                image: Some(image),
                update_mask: Some(FieldMask { paths }),
                source_date_epoch: None,
            }))
            .await
            .map_err(call_error("update image"))?;
        Ok(())
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), ApiError> {
        match ImagesClient::new(self.channel.clone())
            .delete(self.request(DeleteImageRequest {
                name: name.to_owned(),
                sync: false,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(call_error("delete image")(status)),
        }
    }

    /// A blob's record (size, labels), if the content store has it.
    pub async fn info(&self, digest: &str) -> Result<Option<Info>, ApiError> {
        match ContentClient::new(self.channel.clone())
            .info(self.request(InfoRequest {
                digest: digest.to_owned(),
            }))
            .await
        {
            Ok(response) => Ok(response.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(call_error("content info")(status)),
        }
    }

    /// Sets `labels` on a blob in one call, keeping its others.
    pub async fn label_blob(
        &self,
        digest: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel.clone())
            .update(self.request(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_owned(),
                    labels: labels.into_iter().collect(),
                    ..Info::default()
                }),
                update_mask: Some(FieldMask { paths }),
            }))
            .await
            .map_err(call_error("label content"))?;
        Ok(())
    }

    /// A small blob's bytes (manifests and configs).
    pub async fn read(&self, digest: &str) -> Result<Vec<u8>, ApiError> {
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(ReadContentRequest {
                digest: digest.to_owned(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(call_error("read content"))?
            .into_inner();
        let mut bytes = vec![];
        while let Some(chunk) = stream.message().await.map_err(call_error("read content"))? {
            bytes.extend(chunk.data);
        }
        Ok(bytes)
    }

    /// Starts writing a blob of `size` bytes under the reference `reference`.
    pub fn write(&self, reference: &str, size: u64) -> BlobWriter {
        let (requests, stream) = futures::channel::mpsc::channel(4);
        let mut client = ContentClient::new(self.channel.clone());
        let request = self.request(stream);
        let responses = tokio::spawn(async move {
            let mut responses = client.write(request).await?.into_inner();
            while responses.message().await?.is_some() {}
            Ok(())
        });
        BlobWriter {
            requests,
            responses,
            reference: reference.to_owned(),
            total: i64::try_from(size).unwrap_or(i64::MAX),
            offset: 0,
        }
    }

    /// The parents of the snapshotter's active snapshots and views: a container's root
    /// filesystem is an active snapshot whose parent is its image's chain ID.
    pub async fn active_snapshot_parents(&self) -> Result<BTreeSet<String>, ApiError> {
        let error = call_error("list snapshots");
        let mut stream = SnapshotsClient::new(self.channel.clone())
            .list(self.request(ListSnapshotsRequest {
                snapshotter: self.snapshotter.clone(),
                filters: vec![],
            }))
            .await
            .map_err(&error)?
            .into_inner();
        let mut parents = BTreeSet::new();
        while let Some(page) = stream.message().await.map_err(&error)? {
            parents.extend(
                page.info
                    .into_iter()
                    .filter(|i| matches!(i.kind(), Kind::Active | Kind::View))
                    .map(|i| i.parent),
            );
        }
        Ok(parents)
    }

    /// Whether the snapshot (a chain ID) exists.
    pub async fn snapshot_exists(&self, key: &str) -> Result<bool, ApiError> {
        match SnapshotsClient::new(self.channel.clone())
            .stat(self.request(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_owned(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(call_error("stat snapshot")(status)),
        }
    }

    /// Unpacks the layer `layer` on top of the snapshot `parent` (none for a base layer) into
    /// the committed snapshot `chain`, as containerd's unpacker does: prepare an active
    /// snapshot, apply the layer into its mounts, commit it. Returns the layer's diff ID (the
    /// digest of its uncompressed tar), which the caller checks against the image's config.
    pub async fn unpack(
        &self,
        layer: &image_archive::Descriptor,
        parent: Option<&str>,
        chain: &str,
    ) -> Result<String, ApiError> {
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let key = format!("extract-{}", self.unique(chain));
        let mounts = snapshots
            .prepare(self.request(PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
                parent: parent.unwrap_or_default().to_owned(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(call_error("prepare snapshot"))?
            .into_inner()
            .mounts;
        let applied = self.apply(layer, mounts).await;
        let committed = match &applied {
            Ok(_) => snapshots
                .commit(self.request(CommitSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    name: chain.to_owned(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map(drop),
            Err(_) => Ok(()),
        };
        if applied.is_err() || committed.is_err() {
            let _ = snapshots
                .remove(self.request(RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key,
                }))
                .await;
        }
        match committed {
            // Another load unpacked the same chain meanwhile.
            Err(status) if status.code() != Code::AlreadyExists => {
                Err(call_error("commit snapshot")(status))
            }
            _ => applied,
        }
    }

    async fn apply(
        &self,
        layer: &image_archive::Descriptor,
        mounts: Vec<Mount>,
    ) -> Result<String, ApiError> {
        let applied = DiffClient::new(self.channel.clone())
            .apply(self.request(ApplyRequest {
                diff: Some(descriptor(layer)),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(call_error("apply layer"))?
            .into_inner()
            .applied;
        Ok(applied.map(|d| d.digest).unwrap_or_default())
    }
}

/// containerd's descriptor of a blob.
pub fn descriptor(d: &image_archive::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

/// One blob being written: data in order, then a commit that names its digest.
pub struct BlobWriter {
    requests: futures::channel::mpsc::Sender<WriteContentRequest>,
    responses: tokio::task::JoinHandle<Result<(), Status>>,
    reference: String,
    total: i64,
    offset: i64,
}

/// How a blob's write ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Created,
    /// The content store had it already (written meanwhile by someone else).
    Existed,
}

impl BlobWriter {
    pub async fn data(&mut self, data: Vec<u8>) -> Result<(), ApiError> {
        let len = i64::try_from(data.len()).unwrap_or(i64::MAX);
        let request = WriteContentRequest {
            action: WriteAction::Write.into(),
            r#ref: self.reference.clone(),
            total: self.total,
            offset: self.offset,
            data,
            ..WriteContentRequest::default()
        };
        self.offset += len;
        if self.requests.send(request).await.is_err() {
            // The call ended: its status says why.
            return Err(self.finish().await.err().unwrap_or(ApiError::Call {
                call: "write content",
                status: "the stream ended early".into(),
            }));
        }
        Ok(())
    }

    /// Commits the blob, which containerd checks against `digest`, with `labels` set as it is
    /// created.
    pub async fn commit(
        mut self,
        digest: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Written, ApiError> {
        let request = WriteContentRequest {
            action: WriteAction::Commit.into(),
            r#ref: self.reference.clone(),
            total: self.total,
            offset: self.offset,
            expected: digest.to_owned(),
            labels: labels.into_iter().collect(),
            ..WriteContentRequest::default()
        };
        let _ = self.requests.send(request).await;
        self.finish().await
    }

    async fn finish(&mut self) -> Result<Written, ApiError> {
        self.requests.close_channel();
        let error = call_error("write content");
        match (&mut self.responses).await {
            Ok(Ok(())) => Ok(Written::Created),
            Ok(Err(status)) if status.code() == Code::AlreadyExists => Ok(Written::Existed),
            Ok(Err(status)) => Err(error(status)),
            Err(e) => Err(error(Status::internal(e.to_string()))),
        }
    }
}
