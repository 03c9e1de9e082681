// Command derpload is the load generator of benchmarks/derp_relay.py: N sender/receiver pairs of DERP
// clients (Tailscale's own client, tailscale.com/derp/derphttp at the version in go.mod) log in to one DERP
// server; each sender sends fixed-size packets to its receiver as fast as the server takes them, and the
// receivers count what arrives. It prints one JSON object on stdout:
//
//	{"pairs": N, "size": bytes, "seconds": measured, "packets": received, "bytes": received,
//	 "sent": packets sent, "send_errors": n, "recv_errors": n, "cpu_seconds": its own CPU while measuring}
//
// Packets received during the -warmup are not counted. The program exits after -warmup + -duration.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

type result struct {
	Pairs      int     `json:"pairs"`
	Size       int     `json:"size"`
	Seconds    float64 `json:"seconds"`
	Packets    int64   `json:"packets"`
	Bytes      int64   `json:"bytes"`
	Sent       int64   `json:"sent"`
	SendErrors int64   `json:"send_errors"`
	RecvErrors int64   `json:"recv_errors"`
	CPUSeconds float64 `json:"cpu_seconds"` // this process's user+system CPU over the measured time
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func main() {
	url := flag.String("url", "http://127.0.0.1:3340/derp", "DERP server URL")
	pairs := flag.Int("pairs", 1, "sender/receiver client pairs")
	size := flag.Int("size", 1200, "packet size, bytes")
	duration := flag.Duration("duration", 5*time.Second, "measured time")
	warmup := flag.Duration("warmup", 1*time.Second, "time before measuring")
	rate := flag.Float64("rate", 0, "packets per second per sender (0: as fast as the server takes them)")
	flag.Parse()

	quiet := func(string, ...any) {}
	nm := netmon.NewStatic()
	var counting atomic.Bool
	var stop atomic.Bool
	var packets, bytes, sent, sendErrs, recvErrs atomic.Int64

	type pair struct{ tx, rx *derphttp.Client }
	ps := make([]pair, *pairs)
	for i := range ps {
		for _, c := range []**derphttp.Client{&ps[i].tx, &ps[i].rx} {
			cl, err := derphttp.NewClient(key.NewNode(), *url, quiet, nm)
			if err != nil {
				log.Fatalf("client: %v", err)
			}
			cl.TLSConfig = nil
			*c = cl
		}
	}
	var ready sync.WaitGroup
	for i := range ps {
		ready.Add(2)
		go func(p pair) {
			if err := p.tx.Connect(context.Background()); err != nil {
				log.Fatalf("connect: %v", err)
			}
			ready.Done()
		}(ps[i])
		go func(p pair) {
			if err := p.rx.Connect(context.Background()); err != nil {
				log.Fatalf("connect: %v", err)
			}
			ready.Done()
		}(ps[i])
	}
	ready.Wait()

	var done sync.WaitGroup
	for i := range ps {
		p := ps[i]
		dst := p.rx.SelfPublicKey()
		done.Add(2)
		go func() { // receiver
			defer done.Done()
			for !stop.Load() {
				m, err := p.rx.Recv()
				if err != nil {
					if !stop.Load() {
						recvErrs.Add(1)
						time.Sleep(10 * time.Millisecond)
					}
					continue
				}
				if rp, ok := m.(derp.ReceivedPacket); ok && counting.Load() {
					packets.Add(1)
					bytes.Add(int64(len(rp.Data)))
				}
			}
		}()
		go func() { // sender
			defer done.Done()
			pkt := make([]byte, *size)
			t0, n := time.Now(), 0
			for !stop.Load() {
				if *rate > 0 {
					n++
					if ahead := time.Duration(float64(n)/(*rate)*1e9) - time.Since(t0); ahead > time.Millisecond {
						time.Sleep(ahead)
					}
				}
				if err := p.tx.Send(dst, pkt); err != nil {
					sendErrs.Add(1)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				if counting.Load() {
					sent.Add(1)
				}
			}
		}()
	}
	time.Sleep(*warmup)
	counting.Store(true)
	start, cpu0 := time.Now(), cpuSeconds()
	time.Sleep(*duration)
	counting.Store(false)
	elapsed, cpu := time.Since(start).Seconds(), cpuSeconds()-cpu0
	r := result{*pairs, *size, elapsed, packets.Load(), bytes.Load(), sent.Load(), sendErrs.Load(), recvErrs.Load(), cpu}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
	os.Exit(0) // (clients stay blocked in Recv; the process exit closes them)
}
