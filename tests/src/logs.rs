//! A process-wide capture of tracing (and `log`) output, so that tests can
//! check what the agent logged.
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs the capture as the global subscriber on first use and returns it.
    pub fn global() -> Self {
        static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
        CAPTURE
            .get_or_init(|| {
                let capture = LogCapture::default();
                let writer = capture.clone();
                let _ = tracing_log::LogTracer::init();
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .try_init();
                capture
            })
            .clone()
    }

    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Also show it, for people reading a failed test's output.
        let _ = std::io::stderr().write_all(buf);
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
