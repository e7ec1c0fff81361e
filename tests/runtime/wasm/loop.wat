;; Spins forever: only fuel, an epoch interrupt or a signal stops it.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever (br $forever))))
