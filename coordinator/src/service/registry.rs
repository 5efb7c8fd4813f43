//! `hallmark.v1.Registry`: models and datasets.

use std::sync::Arc;

use hallmark_proto::v1::registry_server::Registry;
use hallmark_proto::v1::{
    Dataset, ListDatasetsRequest, ListDatasetsResponse, ListModelsRequest, ListModelsResponse,
    Model,
};
use tonic::{Request, Response, Status};

use super::{Coordinator, status};
use crate::auth::Caller;
use crate::store::now_ms;

pub struct RegistryService(pub Arc<Coordinator>);

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register_model(&self, req: Request<Model>) -> Result<Response<Model>, Status> {
        let caller = Caller::of(&req);
        caller.require_operator("registering a model")?;
        let m = self
            .0
            .store
            .register_model(&req.into_inner(), &caller.actor(), now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(m))
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Caller::of(&req).require_known("listing models")?;
        let models = self.0.store.list_models().await.map_err(status)?;
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn register_dataset(&self, req: Request<Dataset>) -> Result<Response<Dataset>, Status> {
        let caller = Caller::of(&req);
        caller.require_operator("registering a dataset")?;
        let d = self
            .0
            .store
            .register_dataset(&req.into_inner(), &caller.actor(), now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(d))
    }

    async fn list_datasets(
        &self,
        req: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        Caller::of(&req).require_known("listing datasets")?;
        let datasets = self.0.store.list_datasets().await.map_err(status)?;
        Ok(Response::new(ListDatasetsResponse { datasets }))
    }
}
