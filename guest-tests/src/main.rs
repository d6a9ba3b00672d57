//! zapguard guest tests: run by the guest's init inside the VM, they drive `/dev/zapguard` and
//! report KTAP on stdout (which is the serial console). The host harness parses the `ok`/`not ok`
//! lines and sums them with the host tests.
//!
//! Usage: `zapguard-guest-tests [FILTER]` — runs the tests whose name contains FILTER.
//!
//! To add a test: write a `fn name() -> Result<(), String>` below and list it in [`TESTS`].
//! Tests run in list order; the module-reload test runs last because it rebinds the device.

mod dev;
mod ktap;

use ktap::{check_eq, Test};
use shared_regs::{regs, uapi};
use std::path::Path;
use std::process::Command;

const TESTS: &[Test] = &[
    Test {
        name: "dev_node_exists",
        run: dev_node_exists,
    },
    Test {
        name: "get_info_identity",
        run: get_info_identity,
    },
    Test {
        name: "get_info_bad_pointer_efault",
        run: get_info_bad_pointer_efault,
    },
    Test {
        name: "unknown_ioctl_enotty",
        run: unknown_ioctl_enotty,
    },
    Test {
        name: "wrong_size_ioctl_enotty",
        run: wrong_size_ioctl_enotty,
    },
    Test {
        name: "many_opens",
        run: many_opens,
    },
    Test {
        name: "pci_driver_bound",
        run: pci_driver_bound,
    },
    Test {
        name: "test_hmm_dmirror_present",
        run: test_hmm_dmirror_present,
    },
    Test {
        name: "module_reload_rebinds",
        run: module_reload_rebinds,
    },
];

/// Where init puts the modules (see images/initramfs/init).
const MODULE_DIR: &str = "/lib/modules";

fn dev_node_exists() -> Result<(), String> {
    let meta = std::fs::metadata(dev::DEV_PATH).map_err(|e| format!("{}: {e}", dev::DEV_PATH))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_char_device() {
        return Err(format!("{} is not a character device", dev::DEV_PATH));
    }
    Ok(())
}

fn get_info_identity() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO: {e}"))?;
    println!("# get_info: {info:x?}");
    check_eq(info.uapi_version, uapi::UAPI_VERSION, "uapi_version")?;
    check_eq(info.ident, regs::IDENT_MAGIC, "device IDENT register")?;
    check_eq(
        regs::version_major(info.version),
        regs::VERSION_MAJOR,
        "device major version",
    )?;
    check_eq(
        info.caps & regs::CAPS_VALUE,
        regs::CAPS_VALUE,
        "capability bits",
    )?;
    if info.iotlb_entries == 0 || info.asid_count == 0 {
        return Err(format!("device parameters zero: {info:?}"));
    }
    if info.irq_vectors == 0 {
        return Err("driver reports no interrupt vectors".into());
    }
    check_eq(info.reserved, [0; 8], "reserved fields")?;
    Ok(())
}

fn get_info_bad_pointer_efault() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    for bad in [0usize, 1, usize::MAX - 8, 0xffff_8000_0000_0000] {
        match dev::ioctl_raw(&f, uapi::ZG_IOC_GET_INFO, bad) {
            Ok(r) => return Err(format!("GET_INFO to {bad:#x} succeeded ({r})")),
            Err(e) => check_eq(
                dev::errno(&e),
                libc::EFAULT,
                &format!("errno for pointer {bad:#x}"),
            )?,
        }
    }
    Ok(())
}

fn unknown_ioctl_enotty() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    let mut buf = [0u8; 64];
    let cmd = uapi::ioc(uapi::IOC_READ, uapi::ZG_IOC_MAGIC, 0xee, buf.len());
    match dev::ioctl_raw(&f, cmd, buf.as_mut_ptr() as usize) {
        Ok(r) => Err(format!("unknown ioctl {cmd:#x} succeeded ({r})")),
        Err(e) => check_eq(dev::errno(&e), libc::ENOTTY, "errno"),
    }
}

/// GET_INFO's number with another size field is another ioctl: the driver must not accept it.
fn wrong_size_ioctl_enotty() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    let mut buf = [0u8; 128];
    let cmd = uapi::ioc(uapi::IOC_READ, uapi::ZG_IOC_MAGIC, 0x00, 32);
    match dev::ioctl_raw(&f, cmd, buf.as_mut_ptr() as usize) {
        Ok(r) => Err(format!("GET_INFO with size 32 succeeded ({r})")),
        Err(e) => check_eq(dev::errno(&e), libc::ENOTTY, "errno"),
    }
}

fn many_opens() -> Result<(), String> {
    let files: Vec<_> = (0..16)
        .map(|_| dev::open())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("open: {e}"))?;
    for f in &files {
        let info = dev::get_info(f).map_err(|e| format!("GET_INFO: {e}"))?;
        check_eq(
            info.ident,
            regs::IDENT_MAGIC,
            "IDENT through one of many files",
        )?;
    }
    Ok(())
}

fn pci_driver_bound() -> Result<(), String> {
    let drv = Path::new("/sys/bus/pci/drivers/zapguard");
    let bound: Vec<String> = std::fs::read_dir(drv)
        .map_err(|e| format!("{}: {e}", drv.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .collect();
    check_eq(bound.len(), 1, "devices bound to the zapguard driver")?;
    let dev = drv.join(&bound[0]);
    let read = |attr: &str| {
        std::fs::read_to_string(dev.join(attr))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    check_eq(
        read("vendor"),
        format!("{:#06x}", shared_regs::pci::VENDOR_ID),
        "vendor",
    )?;
    check_eq(
        read("device"),
        format!("{:#06x}", shared_regs::pci::DEVICE_ID),
        "device",
    )?;
    // The driver uses MSI-X: the PCI core lists the allocated vectors here.
    let msi = std::fs::read_dir(dev.join("msi_irqs"))
        .map(|d| d.count())
        .unwrap_or(0);
    if msi == 0 {
        return Err("no MSI/MSI-X vectors allocated (msi_irqs empty)".into());
    }
    Ok(())
}

fn test_hmm_dmirror_present() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/hmm_dmirror0")
        .map(drop)
        .map_err(|e| format!("/dev/hmm_dmirror0: {e} (is test_hmm.ko loaded?)"))
}

fn run_cmd(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// rmmod must unbind cleanly with no file open, and insmod must probe the device again.
fn module_reload_rebinds() -> Result<(), String> {
    run_cmd("rmmod", &["zapguard"])?;
    if Path::new(dev::DEV_PATH).exists() {
        return Err(format!("{} still exists after rmmod", dev::DEV_PATH));
    }
    if Path::new("/sys/bus/pci/drivers/zapguard").exists() {
        return Err("driver still registered after rmmod".into());
    }
    run_cmd("insmod", &[&format!("{MODULE_DIR}/zapguard.ko")])?;
    let f = dev::open().map_err(|e| format!("open after reload: {e}"))?;
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO after reload: {e}"))?;
    check_eq(info.ident, regs::IDENT_MAGIC, "IDENT after reload")
}

fn main() {
    let filter = std::env::args().nth(1);
    let mut out = std::io::stdout().lock();
    match ktap::run(TESTS, filter.as_deref(), &mut out) {
        Ok(sum) => std::process::exit(if sum.failed == 0 { 0 } else { 1 }),
        Err(e) => {
            eprintln!("zapguard-guest-tests: cannot write results: {e}");
            std::process::exit(2);
        }
    }
}
