//! Integration tests: the real proxy on 127.0.0.1:0, in-process fake POS, CRM and upstreams,
//! real HTTP clients. One binary so the fakes and helpers are compiled once.

mod admin_demo;
mod binary;
mod crash;
mod crm_outcomes;
mod hardening;
mod ops;
mod outbox;
mod passthrough;
mod properties;
mod sales;
mod support;
