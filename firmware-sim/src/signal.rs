//! Deterministic sensor signals: a daily temperature cycle with noise,
//! humidity that moves against it, pressure as a bounded random walk and a
//! slowly draining battery. Everything derives from a seed; no allocation.

/// SplitMix64: a tiny, fast, deterministic generator that firmware can carry.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately normal (sum of four uniforms), mean 0, standard deviation `sd`.
    pub fn noise(&mut self, sd: f64) -> f64 {
        let s: f64 = (0..4).map(|_| self.unit()).sum::<f64>() - 2.0;
        s * sd * 1.732_050_8
    }
}

/// Derives a per-device seed from the fleet seed and the device index.
pub fn device_seed(fleet_seed: u64, index: u32) -> u64 {
    Rng::new(fleet_seed ^ (u64::from(index) << 32 | u64::from(index))).next_u64()
}

/// One device's sensor set.
#[derive(Debug, Clone)]
pub struct Sensors {
    rng: Rng,
    base_temp: f64,
    day_amplitude: f64,
    base_humidity: f64,
    pressure: f64,
    battery: f64,
    drain_per_reading: f64,
}

/// One set of measurements, rounded to the sensors' resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    pub temperature: f32,
    pub humidity: f32,
    pub pressure: f32,
    pub battery: f32,
}

const DAY_MS: f64 = 86_400_000.0;

impl Sensors {
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        Self {
            base_temp: 14.0 + 10.0 * rng.unit(),
            day_amplitude: 3.0 + 4.0 * rng.unit(),
            base_humidity: 40.0 + 20.0 * rng.unit(),
            pressure: 1000.0 + 25.0 * rng.unit(),
            battery: 4.0 + 0.2 * rng.unit(),
            drain_per_reading: 0.000_01 + 0.000_02 * rng.unit(),
            rng,
        }
    }

    /// Takes a measurement at event time `ts_ms`.
    pub fn measure(&mut self, ts_ms: i64) -> Measurement {
        // Coldest around 04:00, warmest around 16:00 (UTC stands in for local time).
        let phase = ((ts_ms as f64 / DAY_MS).fract() - 0.4167) * std::f64::consts::TAU;
        let cycle = phase.sin();
        let temperature = self.base_temp + self.day_amplitude * cycle + self.rng.noise(0.15);
        let humidity = (self.base_humidity - 8.0 * cycle + self.rng.noise(0.8)).clamp(0.0, 100.0);
        self.pressure = (self.pressure + self.rng.noise(0.05)).clamp(960.0, 1050.0);
        self.battery = (self.battery - self.drain_per_reading).max(3.0);
        Measurement {
            temperature: round(temperature, 100.0),
            humidity: round(humidity, 10.0),
            pressure: round(self.pressure, 10.0),
            battery: round(self.battery, 1000.0),
        }
    }
}

fn round(v: f64, scale: f64) -> f32 {
    ((v * scale).round() / scale) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_signal() {
        let mut a = Sensors::new(7);
        let mut b = Sensors::new(7);
        for i in 0..100 {
            assert_eq!(a.measure(i * 1000), b.measure(i * 1000));
        }
    }

    #[test]
    fn afternoon_is_warmer_than_night_on_average() {
        let mut s = Sensors::new(1);
        let day = 1_767_225_600_000i64; // midnight UTC
        let avg = |s: &mut Sensors, hour: i64| -> f64 {
            (0..50).map(|i| f64::from(s.measure(day + hour * 3_600_000 + i * 1000).temperature)).sum::<f64>() / 50.0
        };
        assert!(avg(&mut s, 16) > avg(&mut s, 4) + 4.0);
    }

    #[test]
    fn values_stay_physical() {
        let mut s = Sensors::new(3);
        for i in 0..10_000 {
            let m = s.measure(i * 60_000);
            assert!((0.0..=100.0).contains(&m.humidity));
            assert!((960.0..=1050.0).contains(&m.pressure));
            assert!((3.0..=4.2).contains(&m.battery));
        }
    }
}
