// kwok-images copies the image list of kwok nodes into the pods scheduled on
// them, so that kwok Stages (which can only look at the Pod being staged) can
// simulate image pulls.
//
// For every Pod bound to a node selected by --node-selector it maintains the
// annotation kwok.enbi.test/missing-images: a comma-separated list of the
// Pod's container images that are not present on its node, or "" when all of
// them are. The images present on a node are listed in the node annotation
// kwok.enbi.test/images (comma, space or newline separated, or a JSON array of
// strings; an entry ending in '*' matches every image with that prefix). A
// node without that annotation has every image.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

const (
	nodeImagesAnnotation   = "kwok.enbi.test/images"
	podMissingAnnotation   = "kwok.enbi.test/missing-images"
	podsByNodeIndex        = "nodeName"
	defaultNodeSelectorArg = "type=kwok"
)

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "path to a kubeconfig")
	nodeSelector := flag.String("node-selector", defaultNodeSelectorArg, "label selector of the nodes whose pods are handled")
	workers := flag.Int("workers", 2, "concurrent pod updates")
	klog.InitFlags(nil)
	flag.Parse()

	if err := run(*kubeconfig, *nodeSelector, *workers); err != nil {
		fmt.Fprintln(os.Stderr, "kwok-images:", err)
		os.Exit(1)
	}
}

func run(kubeconfig, nodeSelector string, workers int) error {
	sel, err := labels.Parse(nodeSelector)
	if err != nil {
		return fmt.Errorf("--node-selector: %w", err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	cfg.UserAgent = "kwok-images"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	factory := informers.NewSharedInformerFactory(client, 10*time.Minute)
	nodeInformer := factory.Core().V1().Nodes().Informer()
	podInformer := factory.Core().V1().Pods().Informer()
	if err := podInformer.AddIndexers(cache.Indexers{podsByNodeIndex: func(obj any) ([]string, error) {
		if p, ok := obj.(*corev1.Pod); ok && p.Spec.NodeName != "" {
			return []string{p.Spec.NodeName}, nil
		}
		return nil, nil
	}}); err != nil {
		return err
	}

	queue := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer queue.ShutDown()
	enqueuePod := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			queue.Add(key)
		}
	}
	enqueueNodePods := func(obj any) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return
		}
		pods, _ := podInformer.GetIndexer().ByIndex(podsByNodeIndex, n.Name)
		for _, p := range pods {
			enqueuePod(p)
		}
	}
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueuePod,
		UpdateFunc: func(_, obj any) { enqueuePod(obj) },
	}); err != nil {
		return err
	}
	if _, err := nodeInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueNodePods,
		UpdateFunc: func(old, obj any) {
			o, n := old.(*corev1.Node), obj.(*corev1.Node)
			if o.Annotations[nodeImagesAnnotation] != n.Annotations[nodeImagesAnnotation] ||
				!labels.Equals(o.Labels, n.Labels) {
				enqueueNodePods(obj)
			}
		},
	}); err != nil {
		return err
	}

	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), nodeInformer.HasSynced, podInformer.HasSynced) {
		return fmt.Errorf("informer caches did not sync")
	}
	klog.InfoS("kwok-images started", "nodeSelector", nodeSelector)

	sync := func(key string) error {
		obj, exists, err := podInformer.GetIndexer().GetByKey(key)
		if err != nil || !exists {
			return err
		}
		pod := obj.(*corev1.Pod)
		if pod.Spec.NodeName == "" || pod.DeletionTimestamp != nil ||
			pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			return nil
		}
		nobj, exists, err := nodeInformer.GetIndexer().GetByKey(pod.Spec.NodeName)
		if err != nil || !exists {
			return err
		}
		node := nobj.(*corev1.Node)
		if !sel.Matches(labels.Set(node.Labels)) {
			return nil
		}
		want := missingImages(pod, node)
		if got, ok := pod.Annotations[podMissingAnnotation]; ok && got == want {
			return nil
		}
		patch, _ := json.Marshal(map[string]any{
			"metadata": map[string]any{"annotations": map[string]string{podMissingAnnotation: want}},
		})
		_, err = client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "kwok-images"})
		if err == nil {
			klog.InfoS("updated pod", "pod", key, "node", node.Name, "missing", want)
		} else if strings.Contains(err.Error(), "not found") {
			return nil
		}
		return err
	}

	for i := 0; i < workers; i++ {
		go wait.UntilWithContext(ctx, func(ctx context.Context) {
			for {
				key, quit := queue.Get()
				if quit {
					return
				}
				if err := sync(key); err != nil {
					klog.ErrorS(err, "sync failed", "pod", key)
					queue.AddRateLimited(key)
				} else {
					queue.Forget(key)
				}
				queue.Done(key)
			}
		}, time.Second)
	}
	<-ctx.Done()
	return nil
}

// missingImages returns the comma-separated, sorted list of the pod's
// container images that the node does not have.
func missingImages(pod *corev1.Pod, node *corev1.Node) string {
	raw, ok := node.Annotations[nodeImagesAnnotation]
	if !ok {
		return ""
	}
	present := parseImageList(raw)
	seen := map[string]bool{}
	var missing []string
	for _, c := range pod.Spec.Containers {
		if seen[c.Image] || hasImage(present, c.Image) {
			continue
		}
		seen[c.Image] = true
		missing = append(missing, c.Image)
	}
	sort.Strings(missing)
	return strings.Join(missing, ",")
}

func parseImageList(raw string) []string {
	raw = strings.TrimSpace(raw)
	if strings.HasPrefix(raw, "[") {
		var list []string
		if err := json.Unmarshal([]byte(raw), &list); err == nil {
			return list
		}
	}
	return strings.FieldsFunc(raw, func(r rune) bool {
		return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '\r'
	})
}

func hasImage(present []string, image string) bool {
	for _, p := range present {
		p = strings.TrimSpace(p)
		if p == image || (strings.HasSuffix(p, "*") && strings.HasPrefix(image, strings.TrimSuffix(p, "*"))) {
			return true
		}
	}
	return false
}
