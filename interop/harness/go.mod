module tailnetd.test/interop/harness

go 1.26
