;; In a preopened directory, writes "written by wasm\n" to out.txt, then copies in.txt
;; to stdout. The directory is the first preopen (fd 3), or the second (fd 4) when the
;; module gets any argument. Exits with 10 + the number of the step that failed.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "out.txt")
  (data (i32.const 120) "in.txt")
  (data (i32.const 200) "written by wasm\0a")
  (func $check (param $errno i32) (param $step i32)
    (if (local.get $errno) (then (call $proc_exit (i32.add (i32.const 10) (local.get $step))))))
  (func (export "_start")
    (local $fd i32) (local $dir i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (local.set $dir (select (i32.const 4) (i32.const 3) (i32.gt_u (i32.load (i32.const 0)) (i32.const 1))))
    ;; out.txt: oflags CREAT|TRUNC (1|8), rights fd_write (1<<6)
    (call $check
      (call $path_open (local.get $dir) (i32.const 0) (i32.const 100) (i32.const 7)
        (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 0))
      (i32.const 1))
    (local.set $fd (i32.load (i32.const 0)))
    (i32.store (i32.const 8) (i32.const 200))
    (i32.store (i32.const 12) (i32.const 16))
    (call $check (call $fd_write (local.get $fd) (i32.const 8) (i32.const 1) (i32.const 16))
      (i32.const 2))
    ;; in.txt: rights fd_read (1<<1)
    (call $check
      (call $path_open (local.get $dir) (i32.const 0) (i32.const 120) (i32.const 6)
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
