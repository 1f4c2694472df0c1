// placeholder until the sample POS lands
#[derive(Default, Clone, Debug)]
pub struct SamplePosOptions;
pub struct SamplePos(std::net::SocketAddr);
impl SamplePos {
    pub async fn start(_: SamplePosOptions) -> std::io::Result<Self> { unimplemented!() }
    pub fn addr(&self) -> std::net::SocketAddr { self.0 }
    pub fn url(&self) -> String { String::new() }
    pub async fn shutdown(self) {}
}
