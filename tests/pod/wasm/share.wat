;; Appends "x\n" to shared.txt in the first bind-mounted preopen (fd 4), then copies the
;; whole file to stdout: run by several modules of one pod, the last prints one line each.
;; Exits with 10 + the number of the step that failed.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "shared.txt")
  (data (i32.const 200) "x\0a")
  (func $check (param $errno i32) (param $step i32)
    (if (local.get $errno) (then (call $proc_exit (i32.add (i32.const 10) (local.get $step))))))
  (func (export "_start")
    (local $fd i32)
    ;; oflags CREAT (1), rights fd_write (1<<6), fdflags APPEND (1)
    (call $check
      (call $path_open (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 10)
        (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 1) (i32.const 0))
      (i32.const 1))
    (local.set $fd (i32.load (i32.const 0)))
    (i32.store (i32.const 8) (i32.const 200))
    (i32.store (i32.const 12) (i32.const 2))
    (call $check (call $fd_write (local.get $fd) (i32.const 8) (i32.const 1) (i32.const 16))
      (i32.const 2))
    ;; read it back: rights fd_read (1<<1)
    (call $check
      (call $path_open (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 10)
        (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 0))
      (i32.const 3))
    (local.set $fd (i32.load (i32.const 0)))
    (i32.store (i32.const 8) (i32.const 1024))
    (i32.store (i32.const 12) (i32.const 1024))
    (call $check (call $fd_read (local.get $fd) (i32.const 8) (i32.const 1) (i32.const 16))
      (i32.const 4))
    (i32.store (i32.const 12) (i32.load (i32.const 16)))
    (call $check (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16))
      (i32.const 5))))
