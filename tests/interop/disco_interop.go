// disco_interop seals and opens disco datagrams with Tailscale's own code (tailscale.com/disco and
// tailscale.com/types/key), for tests/interop/test_disco_go.py. One JSON request per stdin line, one JSON
// answer per stdout line:
//
//	{"op":"seal","priv":HEX,"peer":HEX,"type":"ping","txid":HEX,"nodekey":HEX,"padding":N}
//	{"op":"seal","priv":HEX,"peer":HEX,"type":"pong","txid":HEX,"src":"ip:port"}
//	{"op":"seal","priv":HEX,"peer":HEX,"type":"cmm","eps":["ip:port",...]}
//	  -> {"datagram":HEX}
//	{"op":"open","priv":HEX,"datagram":HEX}
//	  -> {"sender":HEX,"type":"ping|pong|cmm","txid":HEX,"nodekey":HEX,"padding":N,"src":"ip:port","eps":[...]}
//	  or {"error":"..."}
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"

	"go4.org/mem"
	"tailscale.com/disco"
	"tailscale.com/types/key"
)

type req struct {
	Op       string   `json:"op"`
	Priv     string   `json:"priv"`
	Peer     string   `json:"peer"`
	Type     string   `json:"type"`
	TxID     string   `json:"txid"`
	NodeKey  string   `json:"nodekey"`
	Padding  int      `json:"padding"`
	Src      string   `json:"src"`
	Eps      []string `json:"eps"`
	Datagram string   `json:"datagram"`
}

type resp struct {
	Datagram string   `json:"datagram,omitempty"`
	Sender   string   `json:"sender,omitempty"`
	Type     string   `json:"type,omitempty"`
	TxID     string   `json:"txid,omitempty"`
	NodeKey  string   `json:"nodekey,omitempty"`
	Padding  int      `json:"padding,omitempty"`
	Src      string   `json:"src,omitempty"`
	Eps      []string `json:"eps,omitempty"`
	Error    string   `json:"error,omitempty"`
}

func raw32(h string) ([]byte, error) {
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != 32 {
		return nil, fmt.Errorf("want 32 hex bytes, got %q", h)
	}
	return b, nil
}

func handle(r req) (resp, error) {
	pb, err := raw32(r.Priv)
	if err != nil {
		return resp{}, err
	}
	priv := key.DiscoPrivateFromRaw32(mem.B(pb))
	switch r.Op {
	case "seal":
		peerRaw, err := raw32(r.Peer)
		if err != nil {
			return resp{}, err
		}
		var m disco.Message
		var txid [12]byte
		if r.TxID != "" {
			t, err := hex.DecodeString(r.TxID)
			if err != nil || len(t) != 12 {
				return resp{}, fmt.Errorf("bad txid")
			}
			copy(txid[:], t)
		}
		switch r.Type {
		case "ping":
			p := &disco.Ping{TxID: txid, Padding: r.Padding}
			if r.NodeKey != "" {
				nk, err := raw32(r.NodeKey)
				if err != nil {
					return resp{}, err
				}
				p.NodeKey = key.NodePublicFromRaw32(mem.B(nk))
			}
			m = p
		case "pong":
			src, err := netip.ParseAddrPort(r.Src)
			if err != nil {
				return resp{}, err
			}
			m = &disco.Pong{TxID: txid, Src: src}
		case "cmm":
			c := &disco.CallMeMaybe{}
			for _, e := range r.Eps {
				ap, err := netip.ParseAddrPort(e)
				if err != nil {
					return resp{}, err
				}
				c.MyNumber = append(c.MyNumber, ap)
			}
			m = c
		default:
			return resp{}, fmt.Errorf("unknown type %q", r.Type)
		}
		peer := key.DiscoPublicFromRaw32(mem.B(peerRaw))
		pkt := []byte(disco.Magic)
		pkt = priv.Public().AppendTo(pkt)
		pkt = append(pkt, priv.Shared(peer).Seal(m.AppendMarshal(nil))...)
		return resp{Datagram: hex.EncodeToString(pkt)}, nil
	case "open":
		pkt, err := hex.DecodeString(r.Datagram)
		if err != nil {
			return resp{}, err
		}
		src, ok := disco.Source(pkt)
		if !ok {
			return resp{}, fmt.Errorf("not a disco datagram")
		}
		sender := key.DiscoPublicFromRaw32(mem.B(src))
		clear, ok := priv.Shared(sender).Open(pkt[len(disco.Magic)+32:])
		if !ok {
			return resp{}, fmt.Errorf("box does not open")
		}
		m, err := disco.Parse(clear)
		if err != nil {
			return resp{}, err
		}
		raw := sender.Raw32()
		out := resp{Sender: hex.EncodeToString(raw[:])}
		switch m := m.(type) {
		case *disco.Ping:
			out.Type, out.TxID, out.Padding = "ping", hex.EncodeToString(m.TxID[:]), m.Padding
			if !m.NodeKey.IsZero() {
				nk := m.NodeKey.Raw32()
				out.NodeKey = hex.EncodeToString(nk[:])
			}
		case *disco.Pong:
			out.Type, out.TxID, out.Src = "pong", hex.EncodeToString(m.TxID[:]), m.Src.String()
		case *disco.CallMeMaybe:
			out.Type = "cmm"
			for _, e := range m.MyNumber {
				out.Eps = append(out.Eps, e.String())
			}
		default:
			return resp{}, fmt.Errorf("unexpected message %T", m)
		}
		return out, nil
	}
	return resp{}, fmt.Errorf("unknown op %q", r.Op)
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	enc := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var r req
		out := resp{}
		if err := json.Unmarshal(in.Bytes(), &r); err != nil {
			out.Error = err.Error()
		} else if res, err := handle(r); err != nil {
			out.Error = err.Error()
		} else {
			out = res
		}
		if err := enc.Encode(out); err != nil {
			os.Exit(1)
		}
	}
}
