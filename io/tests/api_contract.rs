//! The route's OpenAPI document, pinned: a change to the API's contract shows up here as a
//! snapshot diff to review (`cargo insta review`, or `INSTA_UPDATE=always cargo test -p
//! cim-io --test api_contract` and read the diff), next to the route's own tests of what
//! it accepts (`route_shell.rs`) and CI's schemathesis run (`.ci/api-contract`).

#[test]
fn the_openapi_document() {
    let mut doc = cim_io::route::openapi_document();
    // The crate's version is in the document; the snapshot should not change with it.
    doc["info"]["version"] = "<version>".into();
    insta::assert_snapshot!(serde_json::to_string_pretty(&doc).unwrap());
}
