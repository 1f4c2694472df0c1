//! The response future of [`SalesService`](super::SalesService): passthrough requests keep the
//! inner service's future as it is (no allocation); only sales are boxed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::Body;

/// A boxed sale handling future.
pub type SaleFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

pin_project! {
    #[project = Proj]
    pub enum ResponseFuture<F> {
        Passthrough { #[pin] inner: F },
        Sale { fut: SaleFuture },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Passthrough { inner } => inner.poll(cx),
            Proj::Sale { fut } => fut.as_mut().poll(cx).map(Ok),
        }
    }
}
