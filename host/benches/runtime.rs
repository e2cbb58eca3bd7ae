//! Cost of the sandbox itself: instantiating a plugin for a connection, and
//! one event call into it, with and without wasmtime's component-model-async
//! bookkeeping (`Config::concurrency_support`), in the same run; then the
//! cost of resetting a freed slot for the next instance (maybe another
//! tenant's) by `plugin.memory_reset` and `plugin.keep_resident`: with
//! "decommit", that many bytes are zeroed with a memset, the rest returned
//! to the OS (madvise) and faulted in again; "in-place" (where the kernel
//! has `PAGEMAP_SCAN`), the pages written restored up to that many bytes.
//!
//! `cargo bench --bench runtime` (add `-- --quick` for a shorter run).
//! Under `cargo test` (no `--bench` argument) it is a smoke run of a few
//! iterations.

use std::time::{Duration, Instant};

use wharf::runtime::connection_host::SendLimits;
use wharf::runtime::engine::MemoryReset;
use wharf::runtime::limits::CpuBudget;
use wharf::runtime::{InstanceLimits, Plugin, PluginInstance, Runtime, RuntimeConfig};
use wharf_protocol::{Config, WebSocket};

struct Figures {
    instantiate_us: f64,
    call_32_ns: f64,
    call_1k_ns: f64,
}

fn runtime(concurrency_support: bool, memory_reset: MemoryReset) -> Runtime {
    Runtime::new(RuntimeConfig {
        max_instances: 64,
        limits: InstanceLimits {
            memory: 64 << 20,
            cpu: CpuBudget {
                cpu: Duration::from_secs(1),
                wall: Duration::from_secs(5),
            },
            send: SendLimits {
                max_message_size: 16 << 20,
                send_queue: 64 << 20,
                fragment_size: None,
            },
        },
        cache_dir: None,
        concurrency_support,
        memory_reset,
        wide_slots: false,
    })
    .expect("runtime")
}

/// `check`: verify every echo (the smoke run).
async fn measure(plugin: &Plugin, instances: u32, calls: u32, check: bool) -> Figures {
    // Warm the pool's slots first: the steady state of a busy server.
    for _ in 0..16 {
        drop(plugin.instantiate(0).await.expect("instantiate"));
    }
    let start = Instant::now();
    for i in 0..instances {
        let inst = plugin.instantiate(u64::from(i)).await.expect("instantiate");
        drop(inst);
    }
    let instantiate_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(instances);

    let mut inst = plugin.instantiate(1).await.expect("instantiate");
    let call_32_ns = per_call(&mut inst, &"x".repeat(32), calls, check).await;
    let call_1k_ns = per_call(&mut inst, &"y".repeat(1024), calls, check).await;
    Figures {
        instantiate_us,
        call_32_ns,
        call_1k_ns,
    }
}

async fn per_call(inst: &mut PluginInstance, payload: &str, calls: u32, check: bool) -> f64 {
    // The protocol side the driver hands the plugin's sends to.
    let mut ws = WebSocket::new(Config::default(), std::time::Instant::now());
    let start = Instant::now();
    for _ in 0..calls {
        inst.on_text(payload).await.expect("call");
        // Take the echo, as the driver does, so the outbox stays small.
        let frames = &mut inst.connection().outbox.frames;
        let (text, _) = frames.take_tally();
        ws.send_batch(frames).expect("connection open");
        if check {
            let mut slices = [std::io::IoSlice::new(&[]); 4];
            let n = ws.output_slices(&mut slices);
            let out: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert!(
                text.messages == 1 && out.ends_with(payload.as_bytes()) && out[0] == 0x81,
                "echo of a {} B text: {} messages, {} bytes queued",
                payload.len(),
                text.messages,
                out.len()
            );
        }
        ws.advance_output(ws.output_len());
    }
    start.elapsed().as_secs_f64() * 1e9 / f64::from(calls)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; `cargo test` (`test = true`) does not,
    // and may pass test filters or libtest flags, which the smoke run ignores.
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return;
    }
    let smoke = !args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let (instances, calls) = if smoke {
        (20, 200)
    } else if quick {
        (200, 2_000)
    } else {
        (5_000, 200_000)
    };
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let mut results = Vec::new();
    for concurrency in [false, true] {
        let runtime = runtime(
            concurrency,
            MemoryReset::Decommit {
                keep_resident: 64 << 10,
            },
        );
        let plugin = runtime
            .load("echo", wharf::bundled::ECHO)
            .expect("load echo");
        let f = rt.block_on(measure(&plugin, instances, calls, smoke));
        results.push((concurrency, f));
    }
    println!("plugin: echo (Rust), {instances} instantiations, {calls} calls per size");
    println!(
        "{:<28} {:>14} {:>14} {:>14}",
        "concurrency_support", "instantiate µs", "call 32 B ns", "call 1 KiB ns"
    );
    for (c, f) in &results {
        println!(
            "{:<28} {:>14.2} {:>14.0} {:>14.0}",
            c, f.instantiate_us, f.call_32_ns, f.call_1k_ns
        );
    }
    let (off, on) = (&results[0].1, &results[1].1);
    println!(
        "ratio off/on: instantiate {:.2}, call 32 B {:.2}, call 1 KiB {:.2}",
        off.instantiate_us / on.instantiate_us,
        off.call_32_ns / on.call_32_ns,
        off.call_1k_ns / on.call_1k_ns
    );
    println!();
    println!("{:<28} {:>14}", "slot reset", "instantiate µs");
    let mut resets: Vec<MemoryReset> = [0usize, 64 << 10, 1 << 20]
        .into_iter()
        .map(|keep_resident| MemoryReset::Decommit { keep_resident })
        .collect();
    if wharf::runtime::engine::in_place_available() {
        resets.push(MemoryReset::InPlace { budget: 256 << 10 });
    }
    for reset in resets {
        let runtime = runtime(false, reset);
        let plugin = runtime
            .load("echo", wharf::bundled::ECHO)
            .expect("load echo");
        let f = rt.block_on(measure(&plugin, instances, 1, smoke));
        println!(
            "{:<28} {:>14.2}",
            match reset {
                MemoryReset::Decommit { keep_resident } =>
                    format!("decommit, {} KiB kept", keep_resident >> 10),
                MemoryReset::InPlace { budget } => format!("in place, {} KiB budget", budget >> 10),
            },
            f.instantiate_us
        );
    }
    if smoke {
        println!(
            "runtime smoke run passed in {:.1?} (cargo bench --bench runtime for figures)",
            started.elapsed()
        );
    }
}
