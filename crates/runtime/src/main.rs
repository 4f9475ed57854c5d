//! qadapt-run: answers and scores image quality with the graphs of `qadapt-export` on ONNX Runtime
//! (CPU, CUDA or TensorRT execution provider). Never depends on candle. The commands live in the
//! library (`runtime::cli`).

fn main() -> std::process::ExitCode {
    runtime::cli::main()
}
