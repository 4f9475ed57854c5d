//! Generates `crates/exporter/src/onnx_pb.rs` from `proto/onnx.proto` (see README.md).
fn main() {
    let fds = protox::compile(["proto/onnx.proto"], ["proto"]).expect("compile");
    let mut cfg = prost_build::Config::new();
    cfg.out_dir("out");
    std::fs::create_dir_all("out").unwrap();
    cfg.compile_fds(fds).expect("prost");
}
